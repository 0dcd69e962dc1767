#!/bin/bash
# finlora's speed on 2 cores of a CPU with bf16 instructions (AVX512-BF16; AMX kept off), on a
# lent GPU machine's host CPU.
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
step "matmul shapes: a new M against one seen before (AMX, then AVX512-BF16 alone)"
$CPU2 python3 benchmarks/mm_shapes.py --dtype bf16
ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 $CPU2 python3 benchmarks/mm_shapes.py --dtype bf16
# The rest on the CPU the project is measured on (AVX512-BF16, bf16 matmuls ~2.7x fp32): oneDNN
# is kept from AMX, which this host also has.
export ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16
step "matmul rates, 2 cores, AVX512-BF16"
$CPU2 python3 -c "import torch; torch.set_num_threads(2); from finlora.bench import matmul_rate as r; f, b = r(None), r(torch.bfloat16); print(f'fp32 {f/1e9:.0f} GFLOP/s, bf16 {b/1e9:.0f} GFLOP/s, {b/f:.2f}x')"
step "bench train, 2 cores, AVX512-BF16"
timeout 240 $CPU2 $F bench train configs/fpb-smollm2-lora.yaml $FPB $ON_CPU -n 32 --rounds 2 \
    --variant train.fused_lora=false --json 2>&1 | tail -c 2000 | tee $OUT/bench_train_avx512.txt
step "bench infer, 2 cores, AVX512-BF16"
timeout 100 $CPU2 $F bench infer configs/fpb-smollm2-lora.yaml $FPB $ON_CPU -n 32 --rounds 2 \
    --variant train.trim_padding=false --json 2>&1 | tail -c 2000 | tee $OUT/bench_infer_avx512.txt
step "compiled layers against eager, training, 2 cores, AVX512-BF16"
timeout 130 $CPU2 python3 benchmarks/ab_train.py configs/fpb-smollm2-lora.yaml $FPB $ON_CPU \
    --variant train.compile=true -n 32 --rounds 2 2>&1 | grep -v Loading | tail -6 | tee $OUT/ab_compile_avx512.txt
step done
