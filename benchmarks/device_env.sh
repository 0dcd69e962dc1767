# Sourced by benchmarks/gpu_check.sh and benchmarks/bf16_cpu_check.sh: the environment both set
# up on a lent machine, then the random-weight SmolLM2 they run ($FPB points the FPB recipe at it).
# $D (default .devdata, kept out of git) holds site/, smol/ and Sentences_AllAgree.txt.
D=${D:-.devdata}
OUT=${OUT:-/tmp}
export PYTHONPATH=$D/site:$PWD/src PYTHONUNBUFFERED=1 FINLORA_HOME=/tmp/fh HF_HUB_OFFLINE=1
F="python3 -m finlora"
step() { echo; echo "=== $1 ($(date +%T))"; }
step env
lscpu | grep -E "Model name|^CPU\(s\)"; grep -o -E "avx512_bf16|amx_bf16" /proc/cpuinfo | sort | uniq -c
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'cuda', torch.cuda.is_available())"
python3 benchmarks/random_smollm2.py $D/smol /tmp/smol || exit 1
FPB="--set model.name=/tmp/smol --set data.path=$D/Sentences_AllAgree.txt"
