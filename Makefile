# ulbc: two commands get you going -- `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
STAMP  := $(VENV)/.ulbc-installed
DATA   ?= $(HOME)/.cache/ulbc
# make bench: worker processes for the image baselines (this kind of machine has 2 cores)
JOBS   ?= 2

.PHONY: install demo test test-all fuzz models generative-model video-model data bench lock clean

install: $(STAMP)

# CPU torch first (a local 200 MB CPU wheel here), then every other dependency at a pinned
# version with --no-deps: compressai declares torchvision, and resolving that would replace
# the CPU torch with a multi-GB CUDA build. See README, "Installation". Ray (an optional
# extra for users) is installed too: the tests run --engine ray on a local instance.
$(STAMP): requirements-cpu.txt requirements-ray.txt requirements-test.txt setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q --no-deps -r requirements-cpu.txt -r requirements-ray.txt -r requirements-test.txt
	$(PIP) install -q --no-deps --no-build-isolation -e .
	$(PY) -c "import ulbcodec.image, ulbcodec.cli"
	touch $@

demo: $(STAMP)
	$(VENV)/bin/ulbc demo --out out/demo

test: $(STAMP)
	$(PY) -m pytest -q

test-all: $(STAMP)
	$(PY) -m pytest -q -m ""

# Coverage-guided fuzzing of the .ulb reader and the image/video decoders (docs/robustness.md).
# CI runs the short default (a fixed seed: the same inputs every time); FUZZ="--seconds 3600" for a long run.
FUZZ ?= --runs 20000 --seed 1
fuzz: $(STAMP)
	$(PIP) install -q atheris==2.3.0
	OMP_NUM_THREADS=1 $(PY) fuzz/fuzz_decode.py $(FUZZ)

data: $(STAMP)
	PYTHON=$(PY) scripts/get-data $(DATA)

# Train (or resume training) the shipped default model; see docs/training.md: the first
# run, then six continuations from its package (fresh optimiser and schedule each time).
models: $(STAMP)
	$(PY) -m ulbcodec.train.anchor --data $(DATA) --run runs/default --export runs/default/package
	$(PY) -m ulbcodec.train.anchor --data $(DATA) --run runs/default-continued --init-from runs/default/package \
		--steps 3000 --mse-warmup 0 --export runs/default-continued/package
	$(PY) -m ulbcodec.train.anchor --data $(DATA) --run runs/default-continued2 --init-from runs/default-continued/package \
		--steps 3000 --mse-warmup 0 --export runs/default-continued2/package
	$(PY) -m ulbcodec.train.anchor --data $(DATA) --run runs/default-continued3 --init-from runs/default-continued2/package \
		--steps 3000 --mse-warmup 0 --export runs/default-continued3/package
	$(PY) -m ulbcodec.train.anchor --data $(DATA) --run runs/default-continued4 --init-from runs/default-continued3/package \
		--steps 3000 --mse-warmup 0 --export runs/default-continued4/package
	$(PY) -m ulbcodec.train.anchor --data $(DATA) --run runs/default-continued5 --init-from runs/default-continued4/package \
		--steps 3000 --mse-warmup 0 --mixed-precision no --export runs/default-continued5/package
	$(PY) -m ulbcodec.train.anchor --data $(DATA) --run runs/default-continued6 --init-from runs/default-continued5/package \
		--steps 3000 --mse-warmup 0 --mixed-precision no --export runs/default-continued6/package
	rm -rf models/default && cp -r runs/default-continued6/package models/default

# The settings of both perceptual anchor runs below, written once: the second continues the
# first at the same lambdas, so its rate-level gains carry over unchanged (no remapping).
ANCHOR_PERCEPTUAL := --mse-warmup 0 --perceptual-weight 500 --lr 1e-4 \
	--lambdas 0.000016 0.00004 0.0001 0.00024 0.0006 0.00144

# Train (or resume) the generative decoder, export models/generative: on the first anchor
# codec (runs/default/package), the three stages with the published output (VAE decode of the
# prediction), then stage II continued with the anchor_residual output, again with the detail
# loss, and once more on 384 px crops; then stage II once more on the anchor codec after two
# continuations (runs/default-continued2); last, that anchor codec continued with the detail and VIF losses at
# lambdas one level lower (1200 steps, then 1500 more with a fresh optimiser), and the
# decoder moved onto it unchanged (one stage II step at lr 0; 400 trained steps traded
# VMAF for PSNR); last, stage II on that anchor codec with the SSIMULACRA 2 and block-grid
# losses and a 3-scale discriminator, which models/generative ships (docs/training.md;
# models/default itself is unchanged).
generative-model: $(STAMP)
	$(PY) -m ulbcodec.train.generative --data $(DATA) --run runs/generative --anchor-model runs/default/package \
		--export runs/generative/package
	$(PY) -m ulbcodec.train.generative --data $(DATA) --run runs/generative-residual --anchor-model runs/default/package \
		--init-from runs/generative/package --output anchor_residual --stage2-steps 2400 \
		--export runs/generative-residual/package
	$(PY) -m ulbcodec.train.generative --data $(DATA) --run runs/generative-detail --anchor-model runs/default/package \
		--init-from runs/generative-residual/package --output anchor_residual --stage2-steps 2600 \
		--detail-weight 10 --adv-weight 0.02 --export runs/generative-detail/package
	$(PY) -m ulbcodec.train.generative --data $(DATA) --run runs/generative-crop384 --anchor-model runs/default/package \
		--init-from runs/generative-detail/package --output anchor_residual --stage2-steps 1100 \
		--detail-weight 10 --adv-weight 0.02 --crop 384 --batch 2 --export runs/generative-crop384/package
	$(PY) -m ulbcodec.train.generative --data $(DATA) --run runs/generative-anchor3 --anchor-model runs/default-continued2/package \
		--init-from runs/generative-crop384/package --output anchor_residual --stage2-steps 600 \
		--detail-weight 10 --adv-weight 0.02 --crop 384 --batch 2 --export runs/generative-anchor3/package
	$(PY) -m ulbcodec.train.anchor --data $(DATA) --run runs/anchor-perceptual --init-from runs/default-continued2/package \
		--steps 1200 $(ANCHOR_PERCEPTUAL) --export runs/anchor-perceptual/package
	$(PY) -m ulbcodec.train.anchor --data $(DATA) --run runs/anchor-perceptual2 --init-from runs/anchor-perceptual/package \
		--steps 1500 $(ANCHOR_PERCEPTUAL) --export runs/anchor-perceptual2/package
	$(PY) -m ulbcodec.train.generative --data $(DATA) --run runs/generative-moved2 \
		--anchor-model runs/anchor-perceptual2/package --init-from runs/generative-anchor3/package \
		--output anchor_residual --stage2-steps 1 --lr 0 --detail-weight 10 --adv-weight 0.02 --crop 384 --batch 2 \
		--export runs/generative-moved2/package
	$(PY) -m ulbcodec.train.generative --data $(DATA) --run runs/generative-ssimu2 \
		--anchor-model runs/generative-moved2/package --init-from runs/generative-moved2/package \
		--output anchor_residual --stage2-steps 1000 --lr 1e-4 --detail-weight 5 --ssimulacra2-weight 5 \
		--grid-weight 10 --disc-scales 3 --adv-weight 0.02 --crop 384 --batch 2 --export models/generative

# Train (or resume) the video model (docs/training.md): the frame predictor on models/generative's
# latent space, then the conditional P-frame codec, which the export adds to that package. Then
# the latent-conditional P frames, as they were trained: the temporal prior on the default anchor
# codec after three continuations (808 steps at 3e-3, then a learning-rate decay with one 146-step
# detour at 3e-3), moved onto the fourth continuation of the default codec (500 steps at 5e-4), then
# onto that codec fine-tuned on half video frames, half photographs (its prior PFRAME_LATENT_STEPS
# more steps at 5e-4), and last the same fine-tune and follow-up from the fifth continuation (the
# keyframe codec of models/video).
# PFRAME_ARGS is the recipe of the P-frame codec of run 7 (no motion, short warm-ups);
# PFRAME_ARGS= trains with the trainer's defaults (run 9: motion-compensated references).
PFRAME_STEPS ?= 1113
PFRAME_ARGS ?= --no-motion --noise-steps 1500 --rate-warmup 600 --lr 2e-4
PFRAME_LATENT_SCHEDULE ?= 808:3e-3 1100:5e-4 1246:3e-3 1500:5e-4
PFRAME_LATENT_STEPS ?= 300
LATENT_PRIOR := OMP_NUM_THREADS=1 $(PY) -m ulbcodec.train.pframe_latent --data $(DATA) --threads 1
video-model: $(STAMP)
	$(PY) -m ulbcodec.train.predictor --data $(DATA) --run runs/predictor --image-model generative \
		--steps 8000 --max-frames 40 --export runs/predictor/package
	OMP_NUM_THREADS=1 $(PY) -m ulbcodec.train.pframe --data $(DATA) --run runs/pframe --threads 1 --batch 8 \
		--steps $(PFRAME_STEPS) $(PFRAME_ARGS) --video-model runs/predictor/package --export runs/pframe/package
	$(PY) -m ulbcodec.train.anchor --data $(DATA) --run runs/video-keyframes --init-from runs/default-continued3/package --steps 0 \
		--into runs/pframe/package --export runs/video-keyframes/package
	for stage in $(PFRAME_LATENT_SCHEDULE); do \
		$(LATENT_PRIOR) --run runs/pframe-latent --video-model runs/video-keyframes/package \
			--steps $${stage%%:*} --lr $${stage##*:} || exit 1; done
	$(LATENT_PRIOR) --run runs/pframe-latent --video-model runs/video-keyframes/package --export runs/pframe-latent/package
	$(PY) -m ulbcodec.train.anchor --data $(DATA) --run runs/video-keyframes4 --init-from runs/default-continued4/package --steps 0 \
		--into runs/pframe-latent/package --export runs/video-keyframes4/package
	$(LATENT_PRIOR) --run runs/pframe-latent-k4 --init-from runs/pframe-latent/package \
		--video-model runs/video-keyframes4/package --steps 500 --lr 5e-4 --export runs/pframe-latent-k4/package
	$(PY) -m ulbcodec.train.anchor --data $(DATA) --run runs/video-keyframes4v --init-from runs/default-continued4/package --steps 1200 \
		--mse-warmup 0 --mixed-precision no --video-fraction 0.5 --into runs/pframe-latent-k4/package \
		--export runs/video-keyframes4v/package
	$(LATENT_PRIOR) --run runs/pframe-latent-k4v --init-from runs/pframe-latent-k4/package \
		--video-model runs/video-keyframes4v/package --steps $(PFRAME_LATENT_STEPS) --lr 5e-4 \
		--export runs/pframe-latent-k4v/package
	$(PY) -m ulbcodec.train.anchor --data $(DATA) --run runs/video-keyframes5v --init-from runs/default-continued5/package \
		--steps 1200 --mse-warmup 0 --mixed-precision no --video-fraction 0.5 --into runs/pframe-latent-k4v/package \
		--export runs/video-keyframes5v/package
	$(LATENT_PRIOR) --run runs/pframe-latent-k5v --init-from runs/pframe-latent-k4v/package \
		--video-model runs/video-keyframes5v/package --steps $(PFRAME_LATENT_STEPS) --lr 5e-4 --export models/video

bench: $(STAMP)
	$(PY) benchmarks/run_all.py --data $(DATA) --jobs $(JOBS)

lock:
	$(PIP) freeze --exclude-editable | grep -v -E '^(pytest|iniconfig|pluggy)==' > requirements-cpu.txt.new
	@echo "review requirements-cpu.txt.new, then move it over requirements-cpu.txt"

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache out
