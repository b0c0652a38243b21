# `make train` / `make test` create the virtual environment on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: train test lint format bench-attention bench-involution bench-moe bench-scaling bench-prepare bench-train-step bench-trainer-overhead study study-v2 study-v3 clean

$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	# the CPU build of torch first, pinned, so nothing pulls a CUDA build
	$(PY) -m pip install --quiet torch==2.13.0
	# DeepSpeed builds against the installed torch: no build isolation
	$(PY) -m pip install --quiet -c constraints.txt --no-build-isolation -e ".[dev,hf,eval]"
	touch $@

train: $(STAMP)
	$(VENV)/bin/leviathan train

test: $(STAMP)
	$(VENV)/bin/pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format . && $(VENV)/bin/ruff check --fix .

bench-attention: $(STAMP)
	$(PY) -m benchmarks.attention

# involution and inv_xcorr against dot (docs/benchmarks.md): eager from T=128 to 8192 (where
# each overtakes dot), then compiled (as training runs them) at T=512, 2048 and 8192; one
# thread, median of 5
INVOLUTION_CASES := "involution K=7" "involution K=31" "inv_xcorr W=4 r=1"
bench-involution: $(STAMP)
	$(PY) -m benchmarks.attention --threads 1 --repeats 5 --paths fast \
	  --seq-lens 128 256 512 1024 2048 4096 8192 --cases $(INVOLUTION_CASES) \
	  --out benchmarks/results/attention_involution.json
	$(PY) -m benchmarks.attention --threads 1 --repeats 5 --paths compiled \
	  --seq-lens 512 2048 8192 --cases "involution K=31" "inv_xcorr W=4 r=1" \
	  --out benchmarks/results/attention_involution_compiled.json

bench-moe: $(STAMP)
	$(PY) -m benchmarks.moe_layer --threads 1 --repeats 5 --processes 3

bench-scaling: $(STAMP)
	$(PY) -m benchmarks.scaling --steps 30

bench-train-step: $(STAMP)
	$(PY) -m benchmarks.train_step --threads 1 --configs tiny.yaml tiny-dot.yaml study-channel.yaml tiny-moe.yaml --out benchmarks/results/train_step.json

bench-prepare: $(STAMP)
	$(PY) -m benchmarks.prepare --sizes 50 400 --workers 1 2

bench-trainer-overhead: $(STAMP)
	$(PY) -m benchmarks.trainer_overhead --configs tiny.yaml tiny-moe.yaml --repeats 5

# The mixer/FFN study of docs/results.md: 5 configs x 3 seeds x 400 steps (about an hour
# on a 2-core CPU), then the learned lags of each correlation mixer against dot.
STUDY := $(foreach c,dot xcorr-w2 xcorr-w4 channel moe,configs/study-$(c).yaml)
STUDY_RUNS := runs/study/runs
study: $(STAMP)
	$(VENV)/bin/leviathan compare $(STUDY) train.threads=2 --seeds 3 --budget steps=400 --out runs/study
	for m in xcorr-w2 xcorr-w4 channel; do \
	  $(VENV)/bin/leviathan inspect --run $(STUDY_RUNS)/study-$$m-s0 \
	    --against $(STUDY_RUNS)/study-dot-s0 --out runs/study/inspect-$$m || exit 1; \
	done

# Study v2 (docs/results.md): Transformer++ (dot, RoPE, RMSNorm, SwiGLU), Primer's dconv,
# token_xcorr W=4 with RoPE, and dot and token_xcorr with learned positions; 3 seeds;
# 3 epochs of the 1.53M-token train split; 2.2M parameters, then 9.6M. Seeds 0..n-1 for
# n = 1, 2, 3 (the finished runs reused), so an interrupted study has every config at the
# seeds it reached; rerunning reuses finished runs and resumes interrupted ones. STUDY2_SIZES=small runs one size.
STUDY2 := $(foreach c,dot dconv xcorr dot-learned xcorr-learned,configs/study2-$(c).yaml)
STUDY2_BUDGET ?= tokens=4.6e6
STUDY2_THREADS ?= 2
STUDY2_SIZES ?= small medium
STUDY2_MEDIUM := model.d_model=384 model.n_layer=5 model.n_head=6 train.lr=1.0e-3
study-v2: $(STAMP)
	for size in $(STUDY2_SIZES); do \
	  extra=$$( [ $$size = medium ] && echo "$(STUDY2_MEDIUM)" ); \
	  for seeds in 1 2 3; do \
	    $(VENV)/bin/leviathan compare $(STUDY2) $$extra train.threads=$(STUDY2_THREADS) \
	      --seeds $$seeds --budget $(STUDY2_BUDGET) --out docs/study-v2/$$size || exit 1; \
	  done; \
	done

# Study v3 (docs/results.md): involution (attention-free, no positions) and inv_xcorr
# (generated token_xcorr filters, RoPE) at study v2's small size, data, budget and seeds,
# against study v2's Transformer++, dconv and token_xcorr runs, reused through the links in
# docs/study-v3/*/runs (not retrained); inv_xcorr beat both token_xcorr and dconv there,
# so it runs at study v2's medium size too. Then the generated filters of each seed 0 that
# has its checkpoints here (the tree keeps records, not checkpoints; study v2 kept none, so
# no --against: docs/study-v2/small/inspect-xcorr has its kernels).
STUDY3 := $(foreach c,study2-dot study2-dconv study2-xcorr study3-involution study3-inv-xcorr,configs/$(c).yaml)
STUDY3_MEDIUM := $(filter-out configs/study3-involution.yaml,$(STUDY3))
study-v3: $(STAMP)
	for seeds in 1 2 3; do \
	  $(VENV)/bin/leviathan compare $(STUDY3) train.threads=$(STUDY2_THREADS) \
	    --seeds $$seeds --budget $(STUDY2_BUDGET) --out docs/study-v3/small || exit 1; \
	done
	for seeds in 1 2 3; do \
	  $(VENV)/bin/leviathan compare $(STUDY3_MEDIUM) $(STUDY2_MEDIUM) train.threads=$(STUDY2_THREADS) \
	    --seeds $$seeds --budget $(STUDY2_BUDGET) --out docs/study-v3/medium || exit 1; \
	done
	for run in small/study3-involution small/study3-inv-xcorr medium/study3-inv-xcorr; do \
	  size=$${run%%/*}; name=$${run#*/}; dir=docs/study-v3/$$size/runs/$$name-s0; \
	  if [ -e $$dir/checkpoints/latest ]; then \
	    $(VENV)/bin/leviathan inspect --run $$dir --out docs/study-v3/$$size/inspect-$${name#study3-} || exit 1; \
	  else echo "$$dir: reused, no checkpoint here; its committed inspect figures stand"; fi; \
	done

clean:
	rm -rf $(VENV) data runs wandb

# The GPU image (docker/Dockerfile): CUDA PyTorch, DeepSpeed with its ops compiled, Ray, this package.
.PHONY: docker
docker:
	docker build -f docker/Dockerfile -t leviathan:latest .
