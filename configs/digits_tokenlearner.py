r"""A small TokenLearner ViT on scikit-learn's handwritten digits: the demo of ``tokenlearner-train``.

    tokenlearner-train --config configs/digits_tokenlearner.py --workdir /tmp/digits_run

Scenic's config fields only (the layout of scenic/projects/token_learner/configs/im1k_token_learner_config.py).
The digits (1500 train / 297 valid, 8x8 grey) are upsampled to 16x16x3 (tokenlearner_torch.training.data);
4x4 patches give a 4x4 grid of 16 tokens, which TokenLearner V1.1 reduces to 8 after the second block.
``get_config('runlocal')``: a few steps, for a smoke test.
"""

import ml_collections

_DIGITS_TRAIN_SIZE = 1500


def get_config(runlocal=''):
  """The digits experiment; ``runlocal`` (any non-empty string) makes it tiny."""
  runlocal = bool(runlocal)
  config = ml_collections.ConfigDict()
  config.experiment_name = 'digits-tokenlearner'

  # Dataset.
  config.dataset_name = 'digits'
  config.data_dtype_str = 'float32'
  config.dataset_configs = ml_collections.ConfigDict()
  config.dataset_configs.image_size = 16

  # Model.
  config.model_name = 'token_learner_classification'
  config.model = ml_collections.ConfigDict()
  config.model.hidden_size = 64
  config.model.tokenizer = ml_collections.ConfigDict()
  config.model.tokenizer.type = 'dynamic'
  config.model.tokenizer.patches = ml_collections.ConfigDict()
  config.model.tokenizer.patches.size = [4, 4]
  config.model.tokenizer.num_tokens = 8
  config.model.tokenizer.tokenlearner_loc = 2
  config.model.tokenizer.use_tokenfuse = False
  config.model.tokenizer.use_v11 = True
  config.model.num_heads = 4
  config.model.mlp_dim = 128
  config.model.num_layers = 4
  config.model.representation_size = None
  config.model.classifier = 'gap'
  config.model.attention_dropout_rate = 0.0
  config.model.dropout_rate = 0.1
  config.model_dtype_str = 'float32'

  # Training.
  config.trainer_name = 'classification_trainer'
  config.optimizer = 'adam'
  config.optimizer_configs = ml_collections.ConfigDict()
  config.optimizer_configs.beta1 = 0.9
  config.optimizer_configs.beta2 = 0.999
  config.optimizer_configs.weight_decay = 0.05
  config.explicit_weight_decay = None
  config.l2_decay_factor = None
  config.max_grad_norm = 1.0
  config.label_smoothing = None
  config.num_training_epochs = 1 if runlocal else 40
  config.batch_size = 64
  config.eval_batch_size = 100
  config.rng_seed = 42
  config.init_head_bias = 0.0

  # Learning rate.
  steps_per_epoch = _DIGITS_TRAIN_SIZE // config.batch_size
  total_steps = config.num_training_epochs * steps_per_epoch
  config.lr_configs = ml_collections.ConfigDict()
  config.lr_configs.learning_rate_schedule = 'compound'
  config.lr_configs.factors = 'constant*linear_warmup*linear_decay'
  config.lr_configs.total_steps = total_steps
  config.lr_configs.end_learning_rate = 1e-5
  config.lr_configs.warmup_steps = 2 if runlocal else 50
  config.lr_configs.base_learning_rate = 2e-3

  # Logging.
  config.write_summary = True
  config.log_summary_steps = 5 if runlocal else 25
  config.log_eval_steps = 10 if runlocal else 100
  config.checkpoint = True
  config.checkpoint_steps = 10 if runlocal else 200
  config.max_checkpoint_keep = 3
  config.debug_train = False
  config.debug_eval = False
  return config
