"""Time and queries against depth (HZO-bisect, HZO-chain, CGE, SPSA, backprop): the same as
`hzo-ext bench`; see hzo_ext/apps/bench.py.

    python benchmarks/bench_depth.py            # -> benchmarks/results/depth_cpu.{csv,png}
"""
from hzo_ext.apps.bench import main

if __name__ == "__main__":
    main()
