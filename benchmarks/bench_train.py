"""Training speed, classic PEFT recipe against finlora's path (same as `finlora bench train`).

.venv/bin/python benchmarks/bench_train.py configs/fpb-smollm2-lora.yaml -n 64 --json
"""

from finlora.cli import main

if __name__ == "__main__":
    import sys

    sys.argv[1:1] = ["bench", "train"]
    main()
