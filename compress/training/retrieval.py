"""Retrieval scores of embeddings (face recognition, person re-identification): every image is
a query against all the others as the gallery, ranked by cosine similarity. recall@1 (the
nearest other image shows the same identity), mAP over each query's same-identity images,
and against a teacher's embeddings of the same images the student's fidelity: the mean cosine
similarity to them and how often its nearest neighbour is the teacher's."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

CHUNK = 1024  # queries scored at a time: a (CHUNK, gallery) similarity matrix, not (gallery, gallery)


def normalized(embeddings: torch.Tensor) -> torch.Tensor:
    return nn.functional.normalize(embeddings.float(), dim=1)


def _similarities(queries: torch.Tensor, gallery: torch.Tensor, offset: int):
    """(first query's index, its chunk's similarities to the gallery), the query itself (gallery
    row `offset + i`) at -inf so it is never its own neighbour. Inputs are normalised embeddings."""
    for start in range(0, len(queries), CHUNK):
        sims = queries[start:start + CHUNK] @ gallery.T
        rows = torch.arange(len(sims), device=sims.device)
        sims[rows, offset + start + rows] = -float("inf")
        yield start, sims


def nearest(queries: torch.Tensor, gallery: torch.Tensor, offset: int) -> torch.Tensor:
    """Index in `gallery` of each query's most similar other image."""
    found = [sims.argmax(1) for _, sims in _similarities(queries, gallery, offset)]
    return torch.cat(found) if found else torch.zeros(0, dtype=torch.long)


def ranked(queries: torch.Tensor, labels: torch.Tensor, gallery: torch.Tensor, gallery_labels: torch.Tensor,
           offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query's nearest other image and its average precision over the gallery's other
    images of its identity (0 for an identity seen once), from one ranking."""
    found, ap = [], []
    for start, sims in _similarities(queries, gallery, offset):
        order = sims.argsort(1, descending=True)[:, :-1]  # the query itself ranks last
        hits = gallery_labels[order].eq(labels[start:start + CHUNK, None]).float()
        ranks = torch.arange(1, hits.shape[1] + 1, device=hits.device)
        found.append(order[:, 0])
        ap.append((hits.cumsum(1) / ranks * hits).sum(1) / hits.sum(1).clamp(min=1))
    if not found:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0)
    return torch.cat(found), torch.cat(ap)


class RetrievalMeter:
    """recall@1 and mAP of the embeddings over every evaluated image (each a query against the
    others, gathered across torchrun ranks); the task's loss per batch; with a teacher, the mean
    cosine similarity to its embeddings and the share of queries whose nearest neighbour is the
    teacher's (fidelity). `correct` (this rank's queries' recall@1 hits) and `divergence` (1 -
    cosine to the teacher, per image) pair two states for keep-best."""

    def __init__(self, task, device):
        self.task, self.device = task, device  # the task scores each batch's loss
        self.embeddings, self.labels, self.teacher_embeddings = [], [], []
        self.loss_sum, self.count = 0.0, 0
        self.correct: list[torch.Tensor] = []
        self.divergence: list[torch.Tensor] = []

    def update(self, embeddings: torch.Tensor, labels: torch.Tensor, teacher_embeddings: torch.Tensor | None = None,
               images: torch.Tensor | None = None) -> None:
        self.embeddings.append(normalized(embeddings).cpu())
        self.labels.append(labels.cpu())
        self.loss_sum += float(self.task.loss(embeddings.float(), labels)) * len(labels)
        self.count += len(labels)
        if teacher_embeddings is not None:
            self.teacher_embeddings.append(normalized(teacher_embeddings).cpu())
            self.divergence.append(1 - (self.embeddings[-1] * self.teacher_embeddings[-1]).sum(1))

    def result(self, distributed_sum: bool) -> dict:
        mine = [torch.cat(x) if x else torch.zeros(0) for x in (self.embeddings, self.labels, self.teacher_embeddings)]
        parts, offset = [mine], 0
        if distributed_sum and dist.is_available() and dist.is_initialized():
            parts = [None] * dist.get_world_size()
            dist.all_gather_object(parts, mine)
            offset = sum(len(p[0]) for p in parts[:dist.get_rank()])
        gallery, labels, teacher = (torch.cat([p[i] for p in parts]) for i in range(3))
        queries = mine[0]
        found, ap = ranked(queries, mine[1], gallery, labels, offset)
        hits = labels[found].eq(mine[1])
        self.correct = [hits]
        n = max(len(gallery), 1)
        totals = torch.tensor([hits.sum(), ap.sum(), self.loss_sum, len(queries)], dtype=torch.float64)
        if len(teacher):
            same = found.eq(nearest(mine[2], teacher, offset)).sum()
            totals = torch.cat([totals, torch.tensor([float(same), float((queries * mine[2]).sum())],
                                                     dtype=torch.float64)])
        if len(parts) > 1:
            dist.all_reduce(totals)
        out = {"recall1": float(totals[0]) / n, "map": float(totals[1]) / n, "loss": float(totals[2]) / n, "images": n}
        if len(teacher):
            out.update(fidelity_recall1=float(totals[4]) / n, fidelity_cosine=float(totals[5]) / n)
        return out
