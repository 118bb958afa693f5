"""The benchmark (``python -m pipeline.bench``; cli.py says what it runs and writes), in its parts: the run plan
(runs.py), launching (launch.py), reading the results (results.py), the performance model's figures for
every run (estimates.py), the report (report.py) and its picture (picture.py); timed.py puts them together,
memory_only.py counts activation memory alone."""
