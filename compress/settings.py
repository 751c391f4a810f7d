"""Every setting of every stage, declared once: type, range, default and help text.

The recipe's sections are these models; the CLI generates its flags from them; each stage
function takes one. A value out of range is refused here, before any work starts.
"""
from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from compress.units import parse_count


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSettings(Settings):
    name: str = Field(description="zoo name (`chansearch models`), torchvision:NAME, timm:NAME, file.py:factory, "
                      "package.module:factory, or a compress checkpoint path")
    pretrained: str | None = Field(None, description="the source's own weights (torchvision or timm), or a local .pth "
                                   "state_dict (default: random init)",
                                   json_schema_extra={"metavar": "torchvision|timm|PATH"})
    num_classes: int | None = Field(None, ge=1, description="classes (zoo models and sources; default: the model's)")
    task: Literal["classify", "segment", "detect", "embed", "restore"] | None = Field(
        None, description="what the model's output is (zoo models and sources; default: read off its output on one "
        "image); embed (an embedding compared by cosine similarity, its labels identities) and restore (an image, "
        "e.g. super-resolution, trained on sr:SPEC:xN pairs) must be declared")
    width_mult: float = Field(1.0, gt=0, description="width multiplier (zoo models)")
    input_size: int | None = Field(None, ge=8, description="input height/width (default: the model's, "
                                   "224 or 32 for *_cifar)")
    trust_code: bool = Field(False, description="rebuild a checkpoint made from your own factory (file.py:factory) "
                             "by importing and calling it again")


class DataSettings(Settings):
    spec: str = Field(description="cifar10:DIR, imagefolder:DIR, npz:FILE or synthetic:N")
    batch_size: int = Field(128, ge=1, description="global batch size (split across torchrun processes)")
    workers: int = Field(2, ge=0, description="data loader processes per rank")


class TrainSettings(Settings):
    epochs: int = Field(10, ge=0, description="training epochs")
    lr: float = Field(0.1, gt=0, description="peak learning rate")
    optimizer: Literal["sgd", "adamw"] = Field("sgd", description="sgd (Nesterov momentum) or adamw")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    weight_decay: float = Field(5e-4, ge=0, description="weight decay (not on BN, biases, depthwise weights)")
    schedule: Literal["cosine", "linear"] = Field("cosine", description="decay per step, after warm-up")
    warmup_epochs: float = Field(0.0, ge=0, description="linear warm-up epochs")
    label_smoothing: float = Field(0.1, ge=0, lt=1, description="label smoothing of the cross-entropy")
    clip_grad: float = Field(0.0, ge=0, description="max gradient norm (0 = off)")
    amp: Literal["none", "bf16", "fp16"] = Field("none", description="mixed precision on CUDA")
    channels_last: bool = Field(True, description="channels_last memory format")
    ema_decay: float = Field(0.0, ge=0, lt=1, description="EMA of the weights (0 = off, e.g. 0.9998)")
    kd_temperature: float = Field(4.0, gt=0, description="KD softmax temperature")
    kd_weight: float = Field(0.5, ge=0, le=1, description="share of the KD loss (with a teacher)")
    feature_weight: float = Field(0.0, ge=0, description="with a teacher of the same architecture (the unpruned "
                                  "model): weight of the layer-wise feature distillation added to the loss, every "
                                  "conv/linear layer pulled towards the teacher's output on the channels it kept "
                                  "(0 = off)")
    block_steps: int = Field(0, ge=0, description="with a teacher of the same architecture (the unpruned model): "
                             "before the epochs, train each block of the net alone for this many steps to reproduce "
                             "the teacher's block output on the channels it kept, on up to `block_images` training "
                             "images (block-wise reconstruction; 0 = off)")
    block_images: int = Field(512, ge=2, description="training images the block-wise reconstruction runs on")
    holdout: int = Field(0, ge=0, description="training images held out (for search, or for keep_best), picked "
                         "with the seed")
    keep_best: bool = Field(False, description="evaluate on the held-out training images as training goes (from "
                            "the start) and return the best state, never worse than the starting one")
    eval_every: int = Field(50, ge=0, description="keep_best: evaluate every N steps, besides after each epoch "
                            "(0 = after each epoch only)")
    val_images: int = Field(0, ge=0, description="evaluation images per epoch (0 = the whole evaluation split)")
    steps_per_epoch: int = Field(0, ge=0, description="cap on steps per epoch (0 = whole training set)")
    seed: int = Field(0, description="random seed")
    deterministic: bool = Field(False, description="deterministic algorithms (bit-exact resume on CPU)")
    qat_epochs: int = Field(0, ge=0, description="quantization-aware recovery: the last N epochs train through "
                            "int8 arithmetic as the int8 export computes it (fake-quantized weights and activations, "
                            "weights on the grid of their BN fold), so an int8 file matches the float model; "
                            "keep_best then scores the quantized net")

    @model_validator(mode="after")
    def _qat(self):
        if self.qat_epochs > self.epochs:
            raise ValueError(f"`qat_epochs` ({self.qat_epochs}) is the last part of `epochs` ({self.epochs}): "
                             "set it at most `epochs`")
        if self.qat_epochs and self.feature_weight:
            raise ValueError("feature distillation matches the float layers the quantization-aware epochs replace: "
                             "set `feature_weight: 0` or `qat_epochs: 0`")
        if self.qat_epochs and self.ema_decay:
            raise ValueError("qat_epochs trains the weights the int8 file will hold; an EMA of them would not be "
                             "on the int8 grid: set `ema_decay: 0` or `qat_epochs: 0`")
        return self


class HeldOutScoring(Settings):
    recal_images: int = Field(2000, ge=1, description="held-out images to recalibrate BN per config")
    eval_images: int = Field(5000, ge=1, description="held-out images to score each config")
    score_size: int | None = Field(None, ge=8, description="score configs at this input size instead of the "
                                   "model's: a cheaper search (benchmarks/bench_search_cost.py measures how far it "
                                   "changes the ranking); extracted nets are recalibrated at the model's own")


class SupernetSettings(TrainSettings):
    method: Literal["slimmable", "pruningnet", "none"] = Field(
        "slimmable", description="US-Nets/AutoSlim slimmable network, MetaPruning's PruningNet, or none "
                                 "(recipes: prune directly)")
    min_width: float = Field(0.25, gt=0, le=1, description="smallest width ratio of each group")
    divisor: int = Field(8, ge=1, description="widths are multiples of this")
    num_random: int = Field(2, ge=0, description="slimmable: random configs per step besides max and min")
    uniform: bool = Field(False, description="slimmable: random configs as one width multiplier, not per group")
    distill: bool = Field(True, description="slimmable: distillation: from the pretrained model itself (frozen) "
                          "when the supernet starts from one, so the shared weights keep what it knew; else in-place, "
                          "from the max config")
    reorder: bool = Field(True, description="most important channels of a pretrained model first (as `prune` "
                          "ranks them), so a width-k slice holds the channels `prune` keeps")
    hidden: int = Field(32, ge=1, description="pruningnet: hidden units of each layer's hypernetwork")
    holdout: int = Field(5000, ge=0, description="training images held out to score configs in the search")

    @model_validator(mode="after")
    def _no_qat(self):
        if self.qat_epochs:
            raise ValueError("a supernet is not exported: quantization-aware recovery (`qat_epochs`) belongs to "
                             "the fine-tune of the network extracted from it")
        return self


def _count_text(value, what: str):
    if value is None:
        return None
    text = str(value).strip()
    if not re.fullmatch(r"\d+(\.\d+)?\s*[KMGkmg]?|\d+(\.\d+)?\s*%", text):
        raise ValueError(f"'{value}' is not a {what} like 150M, 1.2G, 300000 or 50%")
    parse_count(text.replace(" ", ""), what, full=1)
    return text.replace(" ", "")


class Target(Settings):
    """One budget: MACs, params and/or latency (counts, times, or % of the unpruned model)."""

    macs: str | None = Field(None, description="MAC budget: a count (150M, 1.2G) or a share of the unpruned model "
                             "(50%)")
    params: str | None = Field(None, description="parameter budget: a count (1.2M) or a share of the unpruned model "
                               "(40%)")
    latency: str | None = Field(None, description="latency budget on the latency model's clock: a time (3.5ms) or "
                                "a share of the unpruned model's measured time (60%)")

    @model_validator(mode="before")
    @classmethod
    def _latency_ms(cls, data):
        """`latency_ms: 3.5` is the older spelling of `latency: 3.5ms`."""
        if isinstance(data, dict) and data.get("latency_ms") is not None and data.get("latency") is None:
            data = {**{k: v for k, v in data.items() if k != "latency_ms"}, "latency": f"{data['latency_ms']}ms"}
        elif isinstance(data, dict):
            data = {k: v for k, v in data.items() if k != "latency_ms" or v is None}
        return data

    @field_validator("macs", mode="before")
    @classmethod
    def _macs(cls, v):
        return _count_text(v, "MAC count")

    @field_validator("params", mode="before")
    @classmethod
    def _params(cls, v):
        return _count_text(v, "parameter count")

    @field_validator("latency", mode="before")
    @classmethod
    def _latency(cls, v):
        if v is None:
            return None
        text = str(v).strip().lower().replace(" ", "")
        if not re.fullmatch(r"\d+(\.\d+)?(ms|%)?", text) or float(re.sub("ms|%", "", text)) <= 0:
            raise ValueError(f"'{v}' is not a latency like 3.5ms or 60%")
        return text if text.endswith(("ms", "%")) else text + "ms"

    @model_validator(mode="after")
    def _some(self):
        if self.macs is None and self.params is None and self.latency is None:
            raise ValueError("a target needs at least one of macs, params, latency")
        return self

    def tag(self) -> str:
        parts = [f"macs{self.macs}" if self.macs else "", f"params{self.params}" if self.params else "",
                 f"lat{self.latency}" if self.latency else ""]
        return "_".join(p for p in parts if p).replace("%", "pct").replace(".", "p")


class SearchSettings(HeldOutScoring):
    method: Literal["evolution", "random", "greedy"] = Field("evolution", description="search strategy")
    targets: list[Target] = Field([], description="budgets, one result per target")
    greedy_step: float = Field(0.05, gt=0, lt=1, description="greedy: share of the current MACs (of the "
                               "predicted time, under a latency budget) each step removes (the best-ranked groups "
                               "each lose a tenth of their width; smaller is more selective and slower)")
    population: int = Field(50, ge=1, description="evolution: population size")
    parents: int = Field(10, ge=1, description="evolution: top-k parents")
    mutations: int = Field(25, ge=0, description="evolution: mutants per iteration")
    crossovers: int = Field(25, ge=0, description="evolution: crossovers per iteration")
    iterations: int = Field(20, ge=1, description="evolution: iterations")
    mutation_prob: float = Field(0.1, ge=0, le=1, description="evolution: mutation probability per group")
    samples: int = Field(1000, ge=1, description="random: configs per budget")
    seed: int = Field(0, description="random seed")

    @model_validator(mode="after")
    def _parents(self):
        if self.parents > self.population:
            raise ValueError(f"the parent count ({self.parents}) is larger than the population ({self.population}); "
                             "use `parents` <= `population`")
        return self

    def strategy_options(self) -> dict:
        """The settings of the chosen strategy, as the strategy functions take them."""
        if self.method == "greedy":
            return {"step": self.greedy_step}
        if self.method == "random":
            return {"samples": self.samples}
        return {k: getattr(self, k) for k in ("population", "parents", "mutations", "crossovers", "iterations",
                                              "mutation_prob")}


class LutSettings(Settings):
    """The latency model a latency budget is judged by: the runtime, file type and threads it
    times, and how many whole models it is fitted on."""
    runtime: Literal["tflite", "onnxruntime"] = Field("tflite", description="runtime that times the exported file")
    threads: int = Field(1, ge=1, description="inference threads")
    int8: bool = Field(False, description="time int8 files (the export's `int8`), not float ones")
    samples: int = Field(24, ge=4, description="whole models exported and timed to fit the latency model")
    check: int = Field(0, ge=0, description="random configs timed to report the latency model's accuracy")
    runs: int = Field(50, ge=1, description="timed runs per measurement")
    warmup: int = Field(5, ge=0, description="warm-up runs per measurement")
    rebuild: bool = Field(False, description="time the latency model anew and replace this machine's cached one "
                          "(after a busy spell spoiled its timings, or the runtime was upgraded)")

    @model_validator(mode="before")
    @classmethod
    def _backend(cls, data):
        """`backend` is the older spelling of `runtime`."""
        if isinstance(data, dict) and "backend" in data:
            data = {**{k: v for k, v in data.items() if k != "backend"}, "runtime": data.get("runtime", data["backend"])}
        return data


class PruneSettings(Settings):
    importance: str = Field(
        "auto", description="which channels to keep in each group, by name from the importance registry: energy "
        "(each channel's share of the next layers' output, measured on real images), l1 or l2 (weight magnitude), "
        "bn (BN scale), taylor (first-order, on real labelled images), first (the first k), or your own "
        "(compress.pruning.importance.register); auto: energy when there is data, else l1")
    strategy: Literal["uniform", "global"] = Field(
        "global", description="how a budget spreads the cut: by importance across groups (global), or every "
        "group alike (uniform)")
    divisor: int = Field(8, ge=1, description="widths are multiples of this")
    reconstruct_images: int = Field(512, ge=0, description="training images to refit each pruned layer on by "
                                    "least squares, so it reproduces the unpruned layer's output from the "
                                    "channels left (when there is data; 0 = off)")
    recal_images: int = Field(512, ge=0, description="training images to re-estimate BN statistics on after "
                              "pruning, when there is data and no reconstruction (0 = keep the unpruned model's)")
    targets: list[Target] = Field([], description="budgets (macs, params and/or latency), one pruned model per "
                                  "target")

    def importance_for(self, data: bool) -> str:
        """The importance to use, `auto` resolved: energy needs real images."""
        return self.importance if self.importance != "auto" else ("energy" if data else "l1")


class ExtractSettings(Settings):
    """Turning a searched config into a standalone network."""
    weights: Literal["supernet", "teacher"] = Field(
        "supernet", description="where a searched config's weights come from: the supernet's shared weights, or "
        "the pretrained model the supernet was trained from, cut to the searched widths and refitted the way "
        "`prune` does with data (the prune section's settings; needs a pretrained or transferred model and a "
        "slimmable supernet, whose channels are then ordered as `prune` ranks them)")


class TransferSettings(TrainSettings):
    """Training a pretrained model on the recipe's data before it is compressed (a new head
    for the data's classes, then every layer at a low lr)."""
    epochs: int = Field(1, ge=1, description="transfer epochs")
    lr: float = Field(0.005, gt=0, description="peak learning rate (a pretrained net diverges at a "
                      "from-scratch lr)")
    warmup_epochs: float = Field(0.1, ge=0, description="linear warm-up epochs")
    weight_decay: float = Field(4e-5, ge=0, description="weight decay (not on BN, biases, depthwise weights)")


class FinetuneSettings(TrainSettings):
    epochs: int = Field(5, ge=0, description="fine-tuning epochs (0 = keep the pruned weights as they are)")
    lr: float | None = Field(None, gt=0, description="peak learning rate (default: picked by the lr trial, or "
                             "lr_base scaled to the batch size)")
    lr_base: float = Field(0.008, gt=0, description="peak learning rate per 256 images, scaled to the global batch "
                           "size when `lr` is not set (a pruned pretrained net needs a fine-tuning lr, not a "
                           "from-scratch one)")
    lr_trial: int = Field(20, ge=0, description="when `lr` is not set: train a copy at lr_base (batch-scaled) and "
                          "at 4x, then climb or descend by 4x while the held-out loss improves, each for an eighth "
                          "of the run but at least this many steps (the lr annealed to zero over them); in a run 8 "
                          "tries long or more, the best then against twice it over a quarter of the run; fine-tune "
                          "at the best (0 = no trial: lr_base scaled)")
    from_scratch: bool = Field(False, description="retrain the architecture from a fresh initialisation "
                               "(MetaPruning, AutoSlim) instead of fine-tuning its weights")
    distill: bool = Field(True, description="distil from the unpruned model (or the supernet's full config)")
    warmup_epochs: float = Field(0.1, ge=0, description="linear warm-up epochs (from a small lr: a pruned net "
                                 "is closer to a sharp edge than a trained one)")
    block_steps: int = Field(200, ge=0, description="block-wise reconstruction steps per block before the epochs, "
                             "with the unpruned model as teacher (what gains on a few hundred images; 0 = off)")
    holdout: int = Field(500, ge=0, description="training images held out to pick the best state (keep_best; "
                         "at most a tenth of the training set)")
    keep_best: bool = Field(True, description="evaluate on the held-out training images as fine-tuning goes (from "
                            "the start) and return the best state, never worse than the pruned one (a classifier's "
                            "later state must get more held-out images right by more than one standard error of the "
                            "paired difference, or, with a teacher, come closer to it by that much or get more right "
                            "by twice that)")

    @model_validator(mode="after")
    def _scratch(self):
        if self.from_scratch and self.epochs == 0:
            raise ValueError("from_scratch needs epochs > 0: a freshly initialised net must be trained")
        return self


class ExportSettings(Settings):
    formats: list[Literal["onnx", "tflite"]] = Field(["onnx", "tflite"], description="output formats")
    int8: bool = Field(False, description="static int8: int8 weights (per channel) and activations calibrated "
                       "on real images, float input/output (TFLite and ONNX)")
    int8_io: bool = Field(False, description="static int8 with int8 input and output too, for integer-only "
                          "delegates and MCUs (TFLite)")
    dynamic_range: bool = Field(False, description="int8 weights only, activations quantized at run time; needs "
                                "no calibration data (TFLite)")
    calib_images: int = Field(200, ge=1, description="calibration images for static int8 (and for bias "
                              "correction)")
    bias_correction: bool = Field(True, description="round weights to their int8 grid in PyTorch and correct "
                                  "each channel's mean shift on the calibration images (quantized exports)")
    keep_float: int = Field(0, ge=0, description="leave the N ops most sensitive to int8 in float, found by a "
                            "per-op sensitivity pass on the calibration images (static int8)")
    parity_images: int = Field(100, ge=1, description="images compared with PyTorch")
    tolerance: float = Field(1e-4, ge=0, description="max absolute logit difference (float exports)")
    min_agreement: float | None = Field(None, ge=0, le=1, description="fail a quantized export under this agreement "
                                        "with the float model: top-1, or the task's own (mIoU, mAP@50, mean cosine, "
                                        "SSIM); default 0.98 when checked on real images")
    nhwc: bool = Field(False, description="TFLite input in NHWC layout")
    opset: int = Field(18, ge=7, description="ONNX opset")

    @model_validator(mode="after")
    def _one_mode(self):
        if self.dynamic_range and (self.int8 or self.int8_io):
            raise ValueError("`dynamic_range` (int8 weights, float activations) and `int8`/`int8_io` (static "
                             "int8) are different modes; choose one")
        if self.keep_float and not (self.int8 or self.int8_io):
            raise ValueError("`keep_float` applies to static int8; add `int8` or `int8_io`")
        return self

    @property
    def quantize(self) -> str | None:
        """The quantization mode: int8, int8_io, dynamic_range, or None for float."""
        return ("int8_io" if self.int8_io else "int8" if self.int8 else
                "dynamic_range" if self.dynamic_range else None)

    @property
    def agreement_floor(self) -> float:
        return 0.98 if self.min_agreement is None else self.min_agreement


class LatencySettings(Settings):
    backend: Literal["auto", "onnxruntime", "tflite"] = Field(
        "auto", description="runtime (auto: each file on its own, by suffix; onnxruntime or tflite: that runtime's "
                            "files only)")
    threads: int = Field(1, ge=1, description="inference threads")
    runs: int = Field(100, ge=1, description="timed runs")
    warmup: int = Field(10, ge=0, description="untimed warm-up runs")
    device: str = Field("local", description="local, or adb[:SERIAL] for an Android phone")
    budget_ms: float | None = Field(None, gt=0, description="fail (exit 3) when the median is over this")
    benchmark_binary: str = Field("/data/local/tmp/benchmark_model",
                                  description="path of TFLite's benchmark_model on the phone")
    xnnpack: bool = Field(True, description="benchmark_model with XNNPACK (adb)")
    taskset: str | None = Field(None, description="pin benchmark_model to these CPUs, e.g. f0 (adb)",
                                json_schema_extra={"metavar": "MASK"})

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v != "local" and v.split(":")[0] != "adb":
            raise ValueError(f"'{v}' is not local or adb[:SERIAL]")
        return v
