"""Prediction speed, per-sentence generate against finlora's label scoring (`finlora bench infer`).

.venv/bin/python benchmarks/bench_infer.py configs/fpb-smollm2-lora.yaml -n 64 --json
"""

from finlora.cli import main

if __name__ == "__main__":
    import sys

    sys.argv[1:1] = ["bench", "infer"]
    main()
