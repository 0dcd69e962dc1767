#!/bin/bash
# finlora's speed on 2 cores of a CPU with bf16 instructions (AVX512-BF16/AMX), plus a short
# check that the cuda path still trains and scores, on a lent GPU machine.
#
# Run from the repository root: bash benchmarks/bf16_cpu_check.sh. It needs what
# benchmarks/gpu_check.sh needs ($D, default .devdata: site/, smol/, Sentences_AllAgree.txt) and
# writes its JSON results under $OUT (else /tmp). The model is SmolLM2-135M's architecture with
# random weights: speed does not depend on the weights' values.
D=${D:-.devdata}
OUT=${OUT:-/tmp}
export PYTHONPATH=$D/site:$PWD/src PYTHONUNBUFFERED=1 FINLORA_HOME=/tmp/fh HF_HUB_OFFLINE=1
F="python3 -m finlora"
step() { echo; echo "=== $1 ($(date +%T))"; }
step env
lscpu | grep -E "Model name|^CPU\(s\)"; grep -o -E "avx512_bf16|amx_bf16" /proc/cpuinfo | sort | uniq -c
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
python3 benchmarks/random_smollm2.py $D/smol /tmp/smol || exit 1
FPB="--set model.name=/tmp/smol --set data.path=$D/Sentences_AllAgree.txt"
CPU2="taskset -c 0,1"
ON_CPU="--set train.device=cpu --set train.threads=2"
step "bench train, 2 cores (bf16 autocast where the CPU has it)"
timeout 300 $CPU2 $F bench train configs/fpb-smollm2-lora.yaml $FPB $ON_CPU -n 32 --rounds 2 \
    --variant train.fused_lora=false --variant train.trim_padding=false --json 2>&1 \
    | tail -c 2500 | tee $OUT/bench_train_cpu2.txt
step "bench infer, 2 cores"
timeout 120 $CPU2 $F bench infer configs/fpb-smollm2-lora.yaml $FPB $ON_CPU -n 32 --rounds 2 \
    --variant train.trim_padding=false --json 2>&1 | tail -c 2000 | tee $OUT/bench_infer_cpu2.txt
step "profile, 2 cores"
timeout 90 $CPU2 python3 benchmarks/profile_step.py configs/fpb-smollm2-lora.yaml $FPB $ON_CPU \
    -n 32 --rows 30 > $OUT/profile_cpu2.txt 2>&1
grep -E "^===|autocast" $OUT/profile_cpu2.txt
step "cuda: 30 training steps, eval"
timeout 60 $F train configs/fpb-smollm2-lora.yaml $FPB --set train.max_steps=30 -o /tmp/r1 \
    --no-progress 2>&1 | tail -3
timeout 40 $F eval /tmp/r1 --json --no-progress | tail -c 300; echo
step done
