"""Progress of a stage over Ray futures (a tqdm bar that also reads well in job logs)."""

from __future__ import annotations

import sys
from typing import Any, Callable

import ray
from tqdm import tqdm


def gather(futures: list, desc: str, unit: str = "shard", enabled: bool = True,
           on_result: Callable[[Any], str | None] | None = None) -> list:
    """``ray.get`` every future, in order, showing progress as they finish.

    ``on_result`` may return a short postfix (e.g. running document count) for the bar.
    """
    results: dict[Any, Any] = {}
    pending = list(futures)
    position = {f: i for i, f in enumerate(futures)}
    with tqdm(total=len(futures), desc=desc, unit=unit, disable=not enabled, file=sys.stderr,
              mininterval=0.5, dynamic_ncols=True) as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                value = ray.get(ref)
                results[position[ref]] = value
                if on_result is not None:
                    postfix = on_result(value)
                    if postfix:
                        bar.set_postfix_str(postfix, refresh=False)
                bar.update(1)
    return [results[i] for i in range(len(futures))]
