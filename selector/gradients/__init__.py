"""Per-document gradients: the tracked layers, K-FAC / EK-FAC curvature, influence on a reference set,
and the Kronecker-structured random projection GTP uses."""
