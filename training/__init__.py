"""Training: two-stage BLIP-2 pre-training, fine-tuning and evaluation. Writes checkpoints that blip2.load opens;
imports blip2, never the reverse (and nothing here imports research/).

Recipes (``python -m training ...``): ``stage1`` (representation learning), ``stage2`` (generative learning) with
``finetune --task caption|vqa``, ``finetune --task retrieval`` (stage 1 from a stage-1 checkpoint), ``eval`` and
``eval-retrieval``. What they are built from, one job per module:

- ``config``: the typed run configs (dataclasses) and YAML loading with ``extends`` and ``key=value`` overrides
- ``data/``: image-text sources (manifests, WebDataset shards, Tux Paint stamps, easy-vqa, procedural scenes),
  augmentation, collation; ``features``: the frozen encoder's cached features
- ``engine``: the loop shared by every recipe (accelerate, exact resume, logs); ``distributed``: cross-process means
- stage 1: ``qformer`` (the Q-Former with ITC/ITM/ITG and their masks), ``qformer_init`` (BERT / scratch /
  checkpoint), ``stage1_checkpoint`` (the stage-1 folder), ``stage1`` (the recipe)
- stage 2: ``stage2_model`` (soft prompts into a frozen LLM, the losses), ``stage2_init`` (where its parts come
  from), ``text`` (prompts and targets as token ids), ``examples`` and ``sampling`` (what is drawn, how often),
  ``yes_no`` (the yes/no curriculum's classifier and balancing), ``vision_finetune``, ``stage2`` (the recipe)
- evaluation: ``evaluate`` (VQA accuracy, BLEU/CIDEr), ``retrieval`` (ITC + ITM re-ranking), ``metrics``,
  ``samples`` (sample outputs for the model card), ``plot_runs`` (loss curves)
"""
