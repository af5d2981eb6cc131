"""The benchmark suites installed with the package, behind ``euphonium-ray bench SUITE`` (``cli.py``).

One name for one thing: ``euphonium_ray/bench/`` is the library (today the toy-world convergence comparison,
``convergence.py``), the repository's ``bench/`` holds the scripts run by path (GPU benches), the method configs,
the pre-registered protocol and the results, and ``euphonium-ray bench`` is the command.
"""
