"""Retrieval scores of embeddings (face recognition, person re-identification): every image is
a query against all the others as the gallery, ranked by cosine similarity. recall@1 (the
nearest other image shows the same identity), mAP over each query's same-identity images,
and against a teacher's embeddings of the same images the student's fidelity: the mean cosine
similarity to them and how often its nearest neighbour is the teacher's."""
from __future__ import annotations

import torch
from torch import nn

CHUNK = 1024  # queries scored at a time: a (CHUNK, gallery) similarity matrix, not (gallery, gallery)


def normalized(embeddings: torch.Tensor) -> torch.Tensor:
    return nn.functional.normalize(embeddings.float(), dim=1)


def nearest(queries: torch.Tensor, gallery: torch.Tensor, offset: int) -> torch.Tensor:
    """Index in `gallery` of each query's most similar other image (the query itself is
    gallery row `offset + i` and is left out). Inputs are normalised embeddings."""
    found = []
    for start in range(0, len(queries), CHUNK):
        sims = queries[start:start + CHUNK] @ gallery.T
        rows = torch.arange(len(sims), device=sims.device)
        sims[rows, offset + start + rows] = -float("inf")
        found.append(sims.argmax(1))
    return torch.cat(found) if found else torch.zeros(0, dtype=torch.long)


def average_precision(queries: torch.Tensor, labels: torch.Tensor, gallery: torch.Tensor,
                      gallery_labels: torch.Tensor, offset: int) -> torch.Tensor:
    """Each query's average precision over the gallery's other images of its identity (0 for
    an identity seen once)."""
    out = []
    for start in range(0, len(queries), CHUNK):
        sims = queries[start:start + CHUNK] @ gallery.T
        rows = torch.arange(len(sims), device=sims.device)
        sims[rows, offset + start + rows] = -float("inf")
        order = sims.argsort(1, descending=True)[:, :-1]  # the query itself ranks last
        hits = gallery_labels[order].eq(labels[start:start + CHUNK, None]).float()
        ranks = torch.arange(1, hits.shape[1] + 1, device=hits.device)
        precision = hits.cumsum(1) / ranks
        out.append((precision * hits).sum(1) / hits.sum(1).clamp(min=1))
    return torch.cat(out) if out else torch.zeros(0)
