"""The shared toolkit every stage imports, one concern a module (see the README's Layout).

Imports run one way: nothing here imports the pipeline, the stage modules,
Hydra, Ray or pandas."""
