"""Embeddings (face recognition, re-identification): the embed task's loss, distillation and
retrieval scores, and an embedding CNN through prune -> recover -> recall@1 and fidelity ->
ONNX and TFLite, float and int8, each checked against PyTorch."""
import pytest
import torch
from torch import nn

import compress
from compress.data.specs import eval_set, loader, random_subset
from compress.training.evaluate import evaluate
from compress.training.tasks import Embed
from conftest import run_cli


def test_retrieval_scores_count_each_image_against_the_others():
    """Four images of two identities on a circle: each one's nearest other image and its
    ranking are known, so recall@1, mAP and the fidelity to a teacher are exact."""
    angles = torch.tensor([0.0, 0.3, 1.4, 3.0])  # identities 0, 0, 1, 1
    emb = torch.stack([angles.cos(), angles.sin()], 1)
    labels = torch.tensor([0, 0, 1, 1])
    meter = Embed().meter(emb, "cpu")
    meter.update(emb, labels, teacher_embeddings=emb * 3)  # the same directions: full fidelity
    result = meter.result(distributed_sum=False)
    # nearest others: 0->1, 1->0, 2->1 (wrong), 3->2; ranks of the same identity: 1, 1, 3, 1
    assert result["recall1"] == 0.75 and result["images"] == 4
    assert result["map"] == pytest.approx((1 + 1 + 1 / 3 + 1) / 4)
    assert result["fidelity_recall1"] == 1.0 and result["fidelity_cosine"] == pytest.approx(1.0)
    assert meter.correct[0].tolist() == [True, True, False, True]
    assert torch.allclose(meter.divergence[0], torch.zeros(4), atol=1e-6)


def test_the_triplet_loss_takes_each_anchors_hardest_pair_and_distillation_the_direction():
    task = Embed(margin=0.3)
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [-1.0, 0.0]])
    labels = torch.tensor([0, 0, 1, 1])
    unit = nn.functional.normalize(emb, dim=1)
    d = torch.cdist(unit, unit)
    by_hand = torch.stack([(d[0, 1] - d[0, 2] + 0.3).clamp(min=0), (d[1, 0] - min(d[1, 2], d[1, 3]) + 0.3).clamp(min=0),
                           (d[2, 3] - d[2, 0] + 0.3).clamp(min=0), (d[3, 2] - min(d[3, 0], d[3, 1]) + 0.3).clamp(min=0)])
    assert task.loss(emb, labels) == pytest.approx(float(by_hand.mean()))
    assert task.loss(emb, torch.arange(4)) == 0  # no image has a pair in the batch
    assert task.distill(emb, emb * 5, 4.0) == pytest.approx(0.0, abs=1e-6)
    assert task.distill(emb, -emb, 4.0) == pytest.approx(2.0)


class EmbedNet(nn.Module):
    """A small CNN ending in a 16-d embedding (no classifier)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU())
        self.embedding = nn.Linear(64, 16)

    def forward(self, x):
        return self.embedding(self.features(x).mean((2, 3)))


@pytest.mark.slow
def test_an_embedding_net_prunes_recovers_scores_retrieval_and_exports_with_parity(tmp_path, cifar_dir):
    """CIFAR-10's classes stand for identities; the teacher is the trained net itself."""
    from compress import stages
    from compress.settings import DataSettings, ExportSettings, PruneSettings, TrainSettings
    from compress.training.loop import fit
    torch.manual_seed(0)
    model = compress.describe(EmbedNet(), 32, task="embed")
    assert model.card.task == "embed" and model.card.num_classes == 16
    data = DataSettings(spec=f"cifar10:{cifar_dir}", batch_size=64, workers=0)
    quick = TrainSettings(epochs=1, steps_per_epoch=30, lr=0.05, holdout=200, keep_best=True, eval_every=0,
                          val_images=200, channels_last=False)
    trained = fit(model, data, quick, tmp_path / "train", quiet=True)
    pruned = stages.prune(trained, PruneSettings(reconstruct_images=128), macs="50%", data=data.spec).model
    assert 0.47 <= compress.count(pruned, 32)[0] / compress.count(trained, 32)[0] <= 0.50
    recovered = fit(pruned, data, quick.model_copy(update={"kd_weight": 0.7, "lr": 0.01}), tmp_path / "finetune",
                    teacher=trained, quiet=True)
    held = loader(random_subset(eval_set(data.spec, 32, model.card.mean, model.card.std, None), 1000), 100)
    full, result = evaluate(trained, held), evaluate(recovered, held, teacher=trained)
    assert {"recall1", "map", "loss", "fidelity_recall1", "fidelity_cosine"} <= set(result)
    assert full["recall1"] > 0.18 and result["recall1"] > 0.15 and result["fidelity_cosine"] > 0.5  # chance: 0.1
    for fmt in ("onnx", "tflite"):
        report = stages.export(recovered, fmt, tmp_path / f"embed.{fmt}", data=data.spec)
        assert report["parity"]["max_abs_diff"] <= 1e-4 + 1e-4 * report["parity"]["max_abs_logit"]
        int8 = stages.export(recovered, fmt, tmp_path / f"embed_int8.{fmt}", ExportSettings(int8=True),
                             data=data.spec)  # the gate: mean cosine similarity >= 0.98
        assert int8["parity"]["agreement_of"] == "mean cosine" and int8["parity"]["top1_agreement"] > 0.99
        assert 0 < int8["parity"]["nearest_agreement"] <= 1


def test_the_cli_takes_a_declared_embedding_model(tmp_path, cifar_dir):
    """`--task embed` on a model source: evaluated by retrieval, its labels taken as identities
    (a 16-d embedding evaluated on 10 classes would be refused as a classifier)."""
    (tmp_path / "nets.py").write_text("import torch\nfrom torch import nn\n\n"
                                      "def embed_net(num_classes=16):\n"
                                      "    torch.manual_seed(0)\n"
                                      "    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),"
                                      " nn.Flatten(), nn.Linear(8, num_classes))\n")
    out = run_cli("eval", f"{tmp_path / 'nets.py'}:embed_net", "--task", "embed", "--input-size", "32", "--data",
                  f"cifar10:{cifar_dir}", "--images", "64", "--json")
    assert out.returncode == 0, out.stderr[-2000:]
    assert '"recall1"' in out.stdout and '"map"' in out.stdout
    out = run_cli("eval", f"{tmp_path / 'nets.py'}:embed_net", "--task", "embed", "--input-size", "32", "--data",
                  f"cifar10:{cifar_dir}", "--images", "64")
    assert out.returncode == 0 and ": recall@1 " in out.stdout and ", mAP " in out.stdout, out.stderr[-2000:]
