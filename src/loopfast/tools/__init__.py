"""loopfast's command-line tools (``python -m loopfast bench | doctor | soak``): the benchmark
(bench/), the environment check (doctor) and the soak test (soak), apart from the transport.

``import loopfast`` never loads them; they use the transport as any program would.
"""
