"""Ray actors: thin shells over ``selector`` that add resources, batching and placement."""
