"""Lymphoma sub-type classification: the pathology library. It knows nothing of SLURM or submitit;
``jobs/`` wires it to ``hpc/``.

Inputs and data
  settings        every setting as a dataclass, one per config section, with its default
  inputs          labelled images from class folders or a CSV manifest; cases from file names
  images, slides, wsi, tissue   decoding plain images; whole-slide readers, levels, mpp, tissue masks
  download        the public IICBU 2008 data set
  split, crossval case-level splits; grouped, stratified cross-validation folds and their report
Tiles
  tiling          cutting an image into tiles (resize, pad, strided view, background filter)
  tile_sources    the tiles of one input, plain image or whole slide (tiling and prediction share it)
  store, sharding one HDF5 shard written atomically; shard plans, fingerprints, the manifest
  phase_tiles     every shard of a phase read as one indexable collection
  loaders         torch Dataset, samplers (distributed, case-balanced) and DataLoaders over a phase
Models and training
  stain, augment  stain normalisation and HED jitter; DALI / torch augmentation pipelines
  reinhard        Reinhard normalisation of a tile in float32 (torchstain's formulas, faster)
  batch_augment   the batch backend: torch operations on whole batches on the training device
  model, ensemble the DenseNet presets; fold models averaged as one checkpoint
  stochastic_depth  model.drop_path: dense layers dropped per sample in training (forward hooks)
  backbones       pretrained torchvision / timm backbones from local weight files, freezing, input adapter
  training        one training: builders, resume, the epoch loop, checkpoints, TensorBoard
  epochs          train_one_epoch and evaluate, written once
  mixing          mixup and CutMix of a training batch and their mixed loss
  tile_cache      a phase held whole in memory or on the GPU, read once (shared by a job's processes)
  selection       which epoch is kept, early stopping, chance level
  checkpoint      atomic checkpoints with errors that say what to do
  validation      the tutorial's per-tile outputs, confusion, kernels, activations
Prediction and reports
  prediction      tile-vote inference over whole images with read-ahead, per-slide outputs
  prediction_inputs  files, wildcards and TSV or CSV lists to predict
  engines         what runs the model (torch fp32/bf16, ONNX Runtime, OpenVINO) and its export (ONNX, TorchScript)
  read_ahead      reader threads that decode, tile and stain-normalise slides ahead of the model
  features, mil   tile embeddings per slide (CLAM/TRIDENT HDF5); gated attention-MIL on them
  voting, metrics, cohort_report, plots   votes, accuracies, the cohort report, figures
  levels          an image's and a case's class (vote or mean probability), confusions at both levels
  case_bootstrap  intervals from cases drawn with replacement, each draw summed from its cases' own counts
  baseline        the reference logistic regression on colour and texture features
Common
  errors, files   errors a user can act on; atomic writes of text, CSV and arrays
"""

__version__ = "0.1.0"
