"""The tools around training: benchmark, planner, classic pipeline parallelism, reproduce, self-test,
plots, and the trained model's evaluation, export and predictions."""
