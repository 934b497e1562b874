"""The shared toolkit every stage imports, one concern a module (see docs/development.md, Layout).

Imports run one way: nothing here imports the pipeline, the stage modules,
Hydra, Ray or pandas."""
