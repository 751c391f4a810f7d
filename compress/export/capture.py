"""The net as the exporters' graph capture (torch.export, under torch.onnx and litert-torch)
should see it. Both converters fold BatchNorm into the conv before it and map an activation to
one op whether it runs in place or not, but they get there by decomposing each BatchNorm and
each in-place activation op by op under symbolic shapes, most of a conversion's time. Handed
over folded and out of place, the files have the same ops and compute the same, written in
0.3-0.7x the time for MobileNets and EfficientNet-B0 (0.9x for ResNet-50, whose BatchNorms sit
beside their convs, not in a Sequential; benchmarks/RESULTS.md, "Export time")."""
from __future__ import annotations

import collections
import copy

from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval


def out_of_place(model: nn.Module) -> nn.Module:
    """`model` with its torch.nn activations set to run out of place."""
    for module in model.modules():
        if type(module).__module__.startswith("torch.nn.modules") and getattr(module, "inplace", False):
            module.inplace = False
    return model


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """`model` with each BatchNorm2d that follows a plain Conv2d in an nn.Sequential
    (torchvision's conv-norm-activation blocks, for one) folded into the conv. A subclassed
    conv (weight standardization), a layer used twice or a hooked one is left as it is."""
    uses = collections.Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))

    def plain(m: nn.Module) -> bool:
        return uses[id(m)] == 1 and not (m._forward_hooks or m._forward_pre_hooks)

    # a Sequential that keeps Sequential's forward feeds each layer's output to the next alone
    chains = [m for m in model.modules() if isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward]
    for seq in chains:
        names = list(seq._modules)
        for a, b in zip(names, names[1:]):
            conv, bn = seq._modules[a], seq._modules[b]
            if (type(conv) is nn.Conv2d and type(bn) is nn.BatchNorm2d and bn.track_running_stats
                    and plain(conv) and plain(bn)):
                seq._modules[a], seq._modules[b] = fuse_conv_bn_eval(conv, bn), nn.Identity()
    return model


def for_capture(model: nn.Module) -> nn.Module:
    """A copy of `model` in eval mode, its BatchNorms folded and its activations out of place;
    `model` itself is left as it was."""
    return out_of_place(fold_batchnorm(copy.deepcopy(model).eval()))
