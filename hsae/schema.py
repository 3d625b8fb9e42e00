"""The one metric and column schema: names, types, meanings, units, directions and report labels.

Pure data, no imports from the rest of ``hsae``. Everything else reads it or is checked against it:

* ``hsae.metrics.evaluate`` returns exactly the ``sae_metric`` columns plus ``EVALUATE_ONLY``
  (``tests/test_schema.py``);
* ``hsae.results`` takes the Parquet columns, their order and dtypes from ``TRIAL_COLUMNS`` and
  ``CURVE_COLUMNS``; the training code copies ``SAE_METRICS`` into each row;
* ``tune/report.py`` tabulates ``REPORT_METRICS`` under ``label(name)``;
* ``docs/results-schema.md`` names every column (checked by ``tests/test_schema.py``).

Add a metric here first, then in the place that computes it; the tests fail while the two disagree.
"""

from __future__ import annotations

from dataclasses import dataclass

DTYPES = ("string", "Int64", "float64", "boolean")
DIRECTIONS = ("higher", "lower", "")
GROUPS = ("identity", "training", "sae_metric", "evaluation", "meta")


@dataclass(frozen=True)
class Column:
    """One column (or metric): what it is called, stored as, means, is measured in and which way is better."""

    name: str
    dtype: str  # pandas dtype: "string", "Int64", "float64"
    meaning: str  # one line, what a reader needs
    unit: str = ""  # e.g. "normalised units", "features/token", "fraction", "nats", "s", "tokens"
    direction: str = ""  # "higher" / "lower" is better, "" when neither
    label: str = ""  # short header for report tables (default: the name)
    group: str = ""  # "identity", "training", "sae_metric", "evaluation", "meta"

    @property
    def header(self) -> str:
        """The label a report table shows: ``label`` when set, else the name."""
        return self.label or self.name


def _c(name: str, dtype: str, meaning: str, unit: str = "", direction: str = "", label: str = "",
       group: str = "") -> Column:
    return Column(name, dtype, meaning, unit, direction, label, group)


_ID, _TRAIN, _SAE, _EVAL, _META = GROUPS

# trials.parquet: the fixed columns in file order (cfg_* columns follow, one per configuration value).
TRIAL_COLUMNS: tuple[Column, ...] = (
    _c("experiment", "string", "the sweep name (--experiment, default <profile>-<space>) that trained the trial; "
       "every sweep into the results directory skips trials already finished there", group=_ID),
    _c("space", "string", "the space file of the sweep that trained the trial", group=_ID),
    _c("spaces", "string", "every space that asked for the trial in this results directory, as a sorted JSON list "
       "(the report's section of a space shows the rows whose list names it)", group=_ID),
    _c("experiments", "string", "every experiment that asked for the trial in this results directory, as a sorted "
       "JSON list", group=_ID),
    _c("variant", "string", "SAE variant registry name (docs/variants.md)", group=_ID),
    _c("trial_id", "string", "content hash of (variant, params, seed, arm, context: model weights, layer, corpus "
       "split, profile and training settings), never of the space or experiment names: one trial in every space "
       "and experiment that asks for it, new for another model or budget", group=_ID),
    _c("seed", "Int64", "training seed (42, 43, ... with --seeds N)", group=_ID),
    _c("arm", "string", "the space block's arm: label (docs/sweeps.md, \"Arms\"); null for an unlabelled block, whose "
       "arm is its variant and parameters. A labelled arm trains from a seed derived from (seed, arm)", group=_ID),
    _c("headline_metric", "string", "the metric the verdict's claims are made on, declared before the run "
       "(Profile.headline_metric; docs/evaluation.md, \"Headline\")", group=_META),
    _c("equivalence_margin", "float64", "the headline's equivalence margin, declared with it: an arm shown to differ "
       "from relu by less than this is 'equivalent' (Profile.equivalence_margin; docs/evaluation.md)", group=_META),
    _c("seed_looks", "Int64", "looks the run declared at the verdict (1; more with --until-decided, each at "
       "0.05 / seed_looks; docs/evaluation.md, \"Seeds in stages\")", group=_META),
    _c("status", "string", "completed, early_stopped (ASHA), failed (exception) or degenerate (guard tripped)",
       group=_META),
    _c("error", "string", "the reason for a failed or degenerate trial", group=_META),
    _c("profile", "string", "activation profile the trial trained on", group=_ID),
    _c("model", "string", "model the activations came from", group=_ID),
    _c("layer", "Int64", "model layer the activations came from", group=_ID),
    _c("harvest_dtype", "string", "the dtype of the forward that computed every activation row, held-out ones included "
       "(the profile's harvest.model.dtype resolved on the activation server's device; part of the harvest's key; docs/"
       "performance.md, \"A bf16 harvest\")", group=_ID),
    _c("sae_path", "string", "the trained SAE in the SAELens layout (cfg.json + sae_weights.safetensors), relative "
       "to the results directory: saes/<trial_id>; completed trials only", group=_META),
    _c("source", "string", "external arms only (docs/sweeps.md, \"External arms\"): how the SAE was named, folder "
       "(a path) or registry (a pretrained_saes.yaml entry); null for a trained arm", group=_ID),
    _c("source_path", "string", "external arms only: the absolute folder the SAE was loaded from (cfg.json + "
       "sae_weights.safetensors)", group=_ID),
    _c("source_architecture", "string", "external arms only: the architecture its cfg.json names (standard, topk, "
       "jumprelu, gated)", group=_ID),
    _c("search_objectives", "string", "--search optuna: the study's objectives as metric:direction, comma-separated "
       "(two or more: a multi-objective study; the report draws its Pareto front)", group=_META),
    _c("search_study", "string", "--search optuna: the Optuna study the trial belongs to (in --optuna-storage, "
       "default optuna.db in the results directory)", group=_META),
    _c("steps", "Int64", "training steps taken (a completed trial: cfg_steps + extensions x cfg_extension_steps)",
       "steps", group=_TRAIN),
    _c("tokens", "Int64", "training tokens seen (steps x batch size)", "tokens", group=_TRAIN),
    _c("wall_s", "float64", "training wall time", "s", group=_TRAIN),
    _c("tokens_per_s", "float64", "training throughput", "tokens/s", "higher", group=_TRAIN),
    _c("mse", "float64", "mean squared reconstruction error on the held-out eval split", "normalised units",
       "lower", group=_SAE),
    _c("explained_variance", "float64", "1 - residual variance / total variance of the eval split", "fraction",
       "higher", "EV", _SAE),
    _c("fvu", "float64", "fraction of variance unexplained (1 - explained_variance)", "fraction", "lower",
       group=_SAE),
    _c("l0", "float64", "mean number of active features per token", "features/token", "lower", group=_SAE),
    _c("l1", "float64", "mean L1 norm of the feature activations per token", "normalised units", group=_SAE),
    _c("dead_fraction", "float64", "fraction of features that never fire on the eval split", "fraction", "lower",
       "dead", _SAE),
    _c("cosine", "float64", "mean cosine similarity between input and reconstruction", "cosine", "higher",
       group=_SAE),
    _c("l2_ratio", "float64", "mean ||x_hat|| / ||x||; below 1 means shrinkage (1 is ideal)", "ratio", group=_SAE),
    _c("decoder_norm_min", "float64", "smallest decoder row norm", "normalised units", group=_SAE),
    _c("decoder_norm_max", "float64", "largest decoder row norm", "normalised units", group=_SAE),
    _c("condition_number", "float64", "mean over groups of sigma_max/sigma_min of the group's decoder rows", "ratio",
       "lower", "cond", _SAE),
    _c("condition_number_max", "float64", "max over groups of sigma_max/sigma_min of the group's decoder rows",
       "ratio", "lower", group=_SAE),
    _c("group_entropy", "float64", "entropy of the activation mass over groups divided by log K (1 = uniform use)",
       "fraction of log K", "higher", "H(groups)/log K", _SAE),
    _c("inter_group_correlation", "float64", "mean activation correlation between features of different groups "
       "(a uniform sample of 8,192 eval rows)",
       "correlation", "lower", "inter-group corr", _SAE),
    _c("inter_group_cosine", "float64", "mean cosine between the groups' centroid decoder directions", "cosine",
       "lower", "inter-group cos", _SAE),
    _c("nce", "float64", "InfoNCE loss of group-activity embeddings against domain labels, on a uniform sample of "
       "4,096 eval rows (null: one domain)",
       "nats", "lower", group=_SAE),
    _c("final_loss", "float64", "last training loss (reconstruction + sparsity + structure)", "normalised units",
       "lower", group=_TRAIN),
    _c("val_mse", "float64", "held-out MSE at the last step (ASHA's metric)", "normalised units", "lower",
       group=_TRAIN),
    _c("val_mse_rel_change", "float64", "relative change of held-out MSE over the last 20% of steps, each end's "
       "level the median of its 3 nearest logged points (curves.parquet; docs/training.md)", "fraction",
       group=_TRAIN),
    _c("plateau_rel_change", "float64", "relative change of held-out MSE over the last 20% of the constant-rate "
       "steps before the lr decay, the last 20% of all steps when there is none (plateau_start_step .. "
       "plateau_end_step), each end's level the median of its 3 nearest logged points, per 20% of the steps "
       "(docs/training.md)", "fraction", group=_TRAIN),
    _c("plateau_multiplier_change", "float64", "relative change of the L0 controller's sparsity multiplier over the "
       "same window, same scaling: the objective was fixed in effect when it is under 0.02 (null: no controller)",
       "fraction", group=_TRAIN),
    _c("plateau_start_step", "Int64", "first logged step of the plateau window (null: the schedule leaves no "
       "window of >= 10% of the steps: never converged)", "steps", group=_TRAIN),
    _c("plateau_end_step", "Int64", "last logged step of the plateau window (at or before the lr decay starts, or "
       "the last)", "steps", group=_TRAIN),
    _c("converged", "boolean", "|plateau_rel_change| < 0.02, |plateau_multiplier_change| < 0.02 (where a controller "
       "acts) and val_mse_rel_change < 0.02: more tokens at the constant rate and a fixed objective stopped helping "
       "and the end is stable; unconverged rows are marked in the report and never ranked", label="converged",
       group=_TRAIN),
    _c("sparsity_coeff_final", "float64", "the shared sparsity (L1) coefficient trained with: l1_coeff x the "
       "multiplier the L0 controller froze (cfg_target_l0; docs/training.md); null for TopK-family variants",
       group=_TRAIN),
    _c("l0_target_met", "boolean", "held-out l0 within 5% of cfg_target_l0; null without a target", group=_TRAIN),
    _c("revived_latents", "Int64", "dead latents resampled during the calibration phase (cfg_resample_every)",
       "latents", group=_TRAIN),
    _c("extensions", "Int64", "times the trial trained cfg_extension_steps more because the convergence rule failed "
       "at its last step (at most cfg_max_extensions; docs/training.md, \"Extensions\")", "extensions",
       group=_TRAIN),
    _c("unique_train_tokens", "Int64", "distinct activation rows (tokens) the SAE's batches drew from", "tokens",
       group=_TRAIN),
    _c("stream_start_batch", "Int64", "stream mode: the first stream batch the trial trained on (it trained on "
       "batches start .. start + steps - 1; docs/sweeps.md)", "batches", group=_TRAIN),
    _c("stream_join", "string", "stream mode: where the trial's batches started (the profile's stream.join): "
       "\"first\" = batch 0, its data a function of the step alone; \"oldest\" = the oldest batch buffered when it "
       "started, so timing decided its data and a seed is no shared data order (docs/sweeps.md)", group=_TRAIN),
    _c("stream_lm_tokens", "Int64", "stream mode: LM tokens the server had computed for the sweep's training "
       "stream when the trial finished (the last row's value is the sweep's cost)", "tokens", group=_TRAIN),
    _c("outlier_tokens", "Int64", "training tokens of the harvest dropped as attention sinks (norm > 10x the median; "
       "docs/training.md)", "tokens", group=_TRAIN),
    _c("precision", "string", "the precision training computed in (bf16 or fp32), resolved on the trial's device from "
       "--precision (auto: measured, hsae.machine); a run setting, not part of the trial key", group=_META),
    _c("precision_reason", "string", "why: the CUDA capability, or the measured bf16 speed-up on this CPU",
       group=_META),
    _c("device", "string", "the device the trial trained on (cpu, cuda:0, ...)", group=_META),
    _c("unlearning_score", "float64", "SAEBench unlearning score as SAEBench defines it, on all questions "
       "(docs/evaluation.md); null unless completed",
       "fraction", "higher", "unlearning", _EVAL),
    _c("random_feature_score", "float64", "the same grid clamping random live features (negative control)",
       "fraction", label="random-feature ctrl", group=_EVAL),
    _c("unlearning_tied_settings", "Int64", "SAEBench settings whose (forget, retain) accuracies duplicate another's",
       "settings", group=_EVAL),
    _c("forget_acc_at_retain99", "float64", "forget accuracy of the setting (SAEBench + extended grid) with the lowest "
       "forget accuracy among those with retain accuracy >= 0.99, chosen on one part of the questions and read on the "
       "other: the mean of fold A (features and setting chosen on select documents and questions, read on test "
       "questions) and, where the grid is cross-fitted, fold B (the reverse; hsae.scoring.reported_folds); null if no "
       "setting meets the bar where any fold chooses", "fraction",
       "lower", "forget@retain≥.99", _EVAL),
    _c("forget_acc_at_retain98", "float64", "the same at retain accuracy >= 0.98", "fraction", "lower",
       "forget@retain≥.98", _EVAL),
    _c("forget_acc_at_retain95", "float64", "the same at retain accuracy >= 0.95", "fraction", "lower",
       "forget@retain≥.95", _EVAL),
    _c("frontier_area", "float64", "removal averaged over retain levels 0.9, 0.905, ..., 1: at each level, 1 - the "
       "forget accuracy of the setting chosen at that retain on one part of the questions, read on the other (0 where "
       "none reaches it), fold A (chosen on select, read on test questions); the declared headline by default "
       "(docs/evaluation.md, 'Headline'; hsae.scoring.area_select_test); null unless completed", "fraction", "higher",
       "frontier area", _EVAL),
    _c("frontier_area_p", "float64", "frontier_area on the probability of the correct option: a setting's forget and "
       "retain values are the shares of the unmodified model's mean probability of the correct option it keeps "
       "(grid.parquet's *_p columns over the baseline row's); at each retain level 0.9..1, 1 - the forget share of the "
       "setting chosen on one part of the questions, read on the other, fold A like it (docs/evaluation.md, "
       "'Continuous outcomes'); null when the grid records no probabilities", "fraction", "higher",
       "frontier area (p)", _EVAL),
    _c("forget_p_at_retain99", "float64", "forget_acc_at_retain99 on the probability of the correct option: the forget "
       "share kept by the setting with the lowest forget share among those keeping >= 0.99 of the retain probability, "
       "chosen and read like it", "fraction", "lower", "forget p@retain p≥.99", _EVAL),
    _c("forget_p_at_retain98", "float64", "the same at a retain share >= 0.98", "fraction", "lower",
       "forget p@retain p≥.98", _EVAL),
    _c("forget_p_at_retain95", "float64", "the same at a retain share >= 0.95", "fraction", "lower",
       "forget p@retain p≥.95", _EVAL),
    _c("settings_selecting_none", "Int64", "grid settings (SAEBench + extended) whose retain threshold left no "
       "feature to clamp: they cannot change an answer", "settings", group=_EVAL),
    _c("controls_ok", "boolean", "the sweep's evaluation controls were in range (positive >= 0.2, negative <= "
       "0.05): false means the evaluation cannot detect removal on this model and no score is a result",
       group=_EVAL),
    _c("n_forget_questions", "Int64", "forget-set bank size behind the score", "questions", group=_EVAL),
    _c("n_retain_questions", "Int64", "retain-set bank size behind the score", "questions", group=_EVAL),
    _c("ce_score_forget", "float64", "CE loss recovered with the SAE spliced in, forget set", "fraction", "higher",
       group=_EVAL),
    _c("ce_score_retain", "float64", "CE loss recovered with the SAE spliced in, retain set", "fraction", "higher",
       "CE score (retain)", _EVAL),
    _c("kl_forget", "float64", "KL divergence of the model's outputs with the SAE spliced in, forget set", "nats",
       "lower", group=_EVAL),
    _c("kl_retain", "float64", "KL divergence of the model's outputs with the SAE spliced in, retain set", "nats",
       "lower", group=_EVAL),
    _c("eval_s", "float64", "evaluation wall time", "s", group=_EVAL),
    *(_c(f"sparse_probe_forget_k{k}", "float64", f"k-sparse probe, forget-vs-rest task: test-document balanced "
         f"accuracy of a logistic probe on the {k} latents with the largest select-document class-mean difference "
         "(docs/evaluation.md, 'Second witness'); null when too few documents", "fraction", "higher",
         f"probe forget k={k}", _EVAL) for k in (1, 2, 5, 20)),
    *(_c(f"sparse_probe_mean_k{k}", "float64", f"the same, k={k}, averaged over every scored one-vs-rest task (the "
         "forget domain and each labelled topic)", "fraction", "higher", f"probe mean k={k}", _EVAL)
      for k in (1, 2, 5, 20)),
    *(_c(f"sparse_probe_random_mean_k{k}", "float64", f"floor: the same probe on {k} random live latents of the SAE "
         "(mean of 5 draws), averaged over tasks", "fraction", label=f"probe random k={k}", group=_EVAL)
      for k in (1, 2, 5, 20)),
    _c("sparse_probe_raw_forget", "float64", "ceiling: the same probe on all d_in mean-pooled raw activations, "
       "forget task (no SAE in it)", "fraction", label="probe raw forget", group=_EVAL),
    _c("sparse_probe_raw_mean", "float64", "ceiling, averaged over tasks", "fraction", label="probe raw mean",
       group=_EVAL),
    _c("sparse_probe_tasks", "Int64", "one-vs-rest tasks the probe scored (each class >= 2 select and >= 2 test "
       "documents)", "tasks", group=_EVAL),
    _c("sparse_probe_test_docs", "Int64", "held-out test documents the probe accuracies are measured on", "documents",
       group=_EVAL),
    _c("sparse_probe_s", "float64", "sparse-probe wall time for this SAE (encode + every probe fit)", "s",
       group=_EVAL),
    _c("unlearning_grid", "string", "JSON list of the unlearning grid settings with their accuracies (per-question "
       "outcomes in grid.parquet)", group=_EVAL),
    _c("finished_at", "string", "ISO time the row was written", group=_META),
)

# curves.parquet: one row per logged step (every log_every steps); loss terms a variant lacks are null.
CURVE_COLUMNS: tuple[Column, ...] = (
    _c("experiment", "string", "sweep name", group=_ID),
    _c("trial_id", "string", "the trial's id (joins trials.parquet)", group=_ID),
    _c("variant", "string", "SAE variant registry name", group=_ID),
    _c("step", "float64", "training step", "steps", group=_TRAIN),
    _c("tokens", "float64", "training tokens seen so far", "tokens", group=_TRAIN),
    _c("wall_s", "float64", "training wall time so far", "s", group=_TRAIN),
    _c("loss", "float64", "total training loss (reconstruction + sparsity + structure)", "normalised units",
       "lower", group=_TRAIN),
    _c("mse", "float64", "reconstruction loss term", "normalised units", "lower", group=_TRAIN),
    _c("l1", "float64", "sparsity loss term (weighted)", "normalised units", group=_TRAIN),
    _c("ortho", "float64", "orthogonality penalty term (ortho / hierarchical variants)", "normalised units",
       group=_TRAIN),
    _c("entropy", "float64", "group-usage entropy term (dynamic variants)", "nats", group=_TRAIN),
    _c("nce", "float64", "contrastive InfoNCE term (weighted, contrastive variants)", "nats", group=_TRAIN),
    _c("matryoshka", "float64", "summed prefix reconstruction errors (matryoshka variants)", "normalised units",
       group=_TRAIN),
    _c("aux", "float64", "auxiliary dead-latent loss term (weighted; 0 while no latent is dead)", "normalised units",
       group=_TRAIN),
    _c("l0", "float64", "active features per token on the training batch", "features/token", group=_TRAIN),
    _c("lr", "float64", "learning rate of the step (warm-up, constant, linear decay)", group=_TRAIN),
    _c("sparsity_multiplier", "float64", "target_l0: the L0 controller's multiplier of the sparsity coefficient "
       "(frozen after the calibration phase)", "ratio", group=_TRAIN),
    _c("revived_latents", "float64", "dead latents resampled since the previous logged step (resampling on)",
       "latents", group=_TRAIN),
    _c("val_mse", "float64", "held-out MSE at this step (the convergence rule reads it)", "normalised units",
       "lower", group=_TRAIN),
    _c("val_inter_group_correlation", "float64", "held-out mean activation correlation across groups (reference "
       "partition for ungrouped SAEs)", "correlation", "lower", group=_SAE),
    _c("val_nce", "float64", "held-out InfoNCE of group-activity embeddings against domain labels", "nats",
       "lower", group=_SAE),
    _c("val_cross_parent_rms", "float64", "hierarchical variants: held-out RMS activation cosine between features "
       "of different level-1 groups", "cosine", "lower", group=_SAE),
    _c("val_sibling_rms", "float64", "hierarchical variants: held-out RMS activation cosine between sibling "
       "level-2 groups of one parent", "cosine", group=_SAE),
    _c("assignment_entropy", "float64", "dynamic variants: mean entropy of a feature's level-1 assignment / log K1 "
       "(1 = uniform)", "fraction of log K1", group=_SAE),
    _c("temperature", "float64", "dynamic variants: the learnt assignment temperature", group=_SAE),
    _c("train_dead_fraction", "float64", "fraction of latents that have not fired for dead_tokens training tokens "
       "(the auxiliary loss's targets)", "fraction", "lower", group=_SAE),
    _c("regroup_moved", "float64", "adaptive variants: fraction of features that changed group at the last "
       "regroup", "fraction", group=_SAE),
    _c("regroup_penalty_ratio", "float64", "adaptive variants: cross-group RMS cosine after / before the last "
       "regroup, on its sample (< 1: regrouping lowered the penalty)", "ratio", group=_SAE),
)

# grid.parquet: one row per evaluated setting; per-question outcomes make every accuracy recomputable.
GRID_COLUMNS: tuple[Column, ...] = (
    _c("trial_id", "string", "the trial the SAE belongs to; 'positive-control' for the SAE-independent control",
       group=_ID),
    _c("control", "string", "sae (the SAE's selected features) | random (random live features of the same SAE: "
       "negative control) | positive (difference-of-means direction removal: positive control) | baseline (the "
       "unmodified model: the reference of every probability share; one per trial and one for positive-control)",
       group=_ID),
    _c("grid", "string", "saebench (SAEBench's 16 settings) | extended (more thresholds and feature counts) | "
       "control", group=_ID),
    _c("bank", "string", "content key of the question bank the outcomes index (questions.parquet)", group=_ID),
    _c("fold", "string", "A: the setting's features were chosen on select documents' activations | B: on test "
       "documents' (a cross-fitted evaluation, EvalConfig.crossfit); null for controls, the unmodified model and "
       "grids before folds had their own features (docs/evaluation.md, 'Folds')", group=_ID),
    _c("retain_threshold", "float64", "features firing on more than this fraction of retain tokens are not "
       "selected", "fraction", group=_EVAL),
    _c("n_features", "Int64", "how many features the setting asks for", "features", group=_EVAL),
    _c("multiplier", "float64", "clamp value: selected features are set to -multiplier where they fire (feature "
       "units); for the positive control its strength", group=_EVAL),
    _c("percentile", "float64", "positive control: retain-projection percentile above which it edits", group=_EVAL),
    _c("features_selected", "Int64", "features the setting actually clamps (0: it cannot change anything)",
       "features", group=_EVAL),
    _c("forget_acc", "float64", "forget-question accuracy under the intervention (all questions)", "fraction",
       "lower", group=_EVAL),
    _c("retain_acc", "float64", "retain-question accuracy under the intervention (all questions)", "fraction",
       "higher", group=_EVAL),
    _c("forget_acc_select", "float64", "forget accuracy on select questions (what fold A chooses a matched-retain "
       "setting on and fold B reports: docs/evaluation.md, 'Select and test')", "fraction", "lower", group=_EVAL),
    _c("retain_acc_select", "float64", "retain accuracy on select questions", "fraction", "higher", group=_EVAL),
    _c("forget_acc_test", "float64", "forget accuracy on test questions (what fold A reports and fold B chooses on)",
       "fraction", "lower", group=_EVAL),
    _c("retain_acc_test", "float64", "retain accuracy on test questions", "fraction", "higher", group=_EVAL),
    _c("retain_acc_exact", "boolean", "false when retain questions were skipped (an upper bound)", group=_EVAL),
    _c("questions_touched", "Int64", "prompts the intervention changed (re-run)", "questions", group=_EVAL),
    _c("edit_ratio", "float64", "mean ||edit|| / ||residual|| over edited token positions: one scale for SAE "
       "clamps and the positive control", "fraction", group=_EVAL),
    _c("forget_correct", "string", "per forget question (questions.parquet order), '1' if still answered "
       "correctly", group=_EVAL),
    _c("retain_correct", "string", "per retain question, '1' if still answered correctly", group=_EVAL),
    _c("forget_p", "float64", "mean probability of the correct option over the forget questions (softmax over the "
       "options' scores, the scores argmax answers with), computed from forget_p_correct's quantised values",
       "probability", group=_EVAL),
    _c("retain_p", "float64", "the same over the retain questions", "probability", group=_EVAL),
    _c("forget_p_select", "float64", "forget_p over select questions", "probability", group=_EVAL),
    _c("retain_p_select", "float64", "retain_p over select questions", "probability", group=_EVAL),
    _c("forget_p_test", "float64", "forget_p over test questions", "probability", group=_EVAL),
    _c("retain_p_test", "float64", "retain_p over test questions", "probability", group=_EVAL),
    _c("forget_p_correct", "string", "per forget question (questions.parquet order), the probability p of the "
       "correct option as round(p * 65535), 4 hex digits big-endian (hsae.scoring.encode_p / decode_p)", group=_EVAL),
    _c("retain_p_correct", "string", "the same per retain question", group=_EVAL),
)

# questions.parquet: every question of every bank; question_id is the position in its bank.
QUESTION_COLUMNS: tuple[Column, ...] = (
    _c("bank", "string", "content key of the bank", group=_ID),
    _c("question_id", "Int64", "position in the bank (the bit position in grid.parquet, per domain in order)",
       group=_ID),
    _c("domain", "string", "forget | retain", group=_ID),
    _c("role", "string", "select (chooses settings, never reported) | test (every reported accuracy): its "
       "document's role in split.parquet (WMDP/MMLU: halves of each domain's questions)", group=_ID),
    _c("doc_id", "string", "the held-out document the question comes from (WMDP/MMLU: subject:index)", group=_ID),
    _c("prompt", "string", "the prompt text", group=_META),
    _c("options", "string", "JSON list of the option texts", group=_META),
    _c("answer", "Int64", "index of the correct option", group=_META),
)

# probe.parquet: one row per (trial, task, features, k) of the k-sparse probe (hsae.evaluation.sparse_probe).
PROBE_COLUMNS: tuple[Column, ...] = (
    _c("trial_id", "string", "the trial the SAE belongs to", group=_ID),
    _c("task", "string", "one-vs-rest task: 'forget' (the forget domain) or a topic label", group=_ID),
    _c("features", "string", "sae (top-k latents by select-document class-mean difference) | random (k random live "
       "latents, mean of the draws: floor) | raw (all d_in raw dimensions: ceiling)", group=_ID),
    _c("k", "Int64", "features the probe reads (d_in for raw)", "features", group=_EVAL),
    _c("accuracy", "float64", "balanced accuracy on the test documents", "fraction", "higher", group=_EVAL),
    _c("latents", "string", "sae rows: JSON list of the chosen latent indices", group=_EVAL),
    _c("n_select_pos", "Int64", "select documents of the task's class (probe fitting)", "documents", group=_EVAL),
    _c("n_select_neg", "Int64", "select documents of the rest", "documents", group=_EVAL),
    _c("n_test_pos", "Int64", "test documents of the task's class (scoring)", "documents", group=_EVAL),
    _c("n_test_neg", "Int64", "test documents of the rest", "documents", group=_EVAL),
)

# split.parquet: every corpus document and whether SAEs train on it.
SPLIT_COLUMNS: tuple[Column, ...] = (
    _c("split", "string", "content key of (corpus content, holdout fraction, seed)", group=_ID),
    _c("doc_id", "string", "the document (the article title for the embedded corpus)", group=_ID),
    _c("domain", "string", "forget | retain", group=_ID),
    _c("part", "string", "train (SAE training activations) | heldout (questions, feature selection, control "
       "directions, CE text)", group=_ID),
    _c("role", "string", "train | select (held out: what selects, i.e. firing frequencies, control directions, "
       "the grid setting meeting a retain bar) | test (held out: the questions and CE text every reported number "
       "comes from); the held-out documents of each domain split in halves", group=_ID),
)

# Metrics that hsae.metrics.evaluate returns and every trial row stores, in row order.
SAE_METRICS: tuple[str, ...] = tuple(c.name for c in TRIAL_COLUMNS if c.group == _SAE)

# What evaluate also returns but no row stores.
EVALUATE_ONLY_COLUMNS: tuple[Column, ...] = (
    _c("n_groups", "float64", "number of groups the group metrics used (reference partition when ungrouped)",
       "groups", group=_SAE),
)
EVALUATE_ONLY: tuple[str, ...] = tuple(c.name for c in EVALUATE_ONLY_COLUMNS)

# The metric columns of the report's tables, in column order.
REPORT_METRICS: tuple[str, ...] = (
    "mse", "explained_variance", "l0", "l1", "dead_fraction", "condition_number", "group_entropy",
    "inter_group_correlation", "inter_group_cosine", "nce", "ce_score_retain", "unlearning_score",
    "random_feature_score",
)

TRIAL_COLUMN_NAMES: tuple[str, ...] = tuple(c.name for c in TRIAL_COLUMNS)
CURVE_COLUMN_NAMES: tuple[str, ...] = tuple(c.name for c in CURVE_COLUMNS)

_BY_NAME: dict[str, Column] = {c.name: c for c in (*TRIAL_COLUMNS, *EVALUATE_ONLY_COLUMNS)}


def column(name: str) -> Column:
    """The trial column (or evaluate-only metric) called ``name``; KeyError if the schema lacks it."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"{name!r} is not in hsae.schema: add it to TRIAL_COLUMNS (and the docs)") from None


def label(name: str) -> str:
    """Short report header of ``name``; names outside the schema (cfg_* columns, ``n``) are their own label."""
    col = _BY_NAME.get(name)
    return col.header if col else name
