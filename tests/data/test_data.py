import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from compress import CompressError
from compress.data.specs import build_dataset, eval_set, train_holdout, transforms

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def test_cifar10_npz_folder(cifar_dir):
    test = eval_set(f"cifar10:{cifar_dir}", 32, MEAN, STD, 10)
    assert len(test) == 10000
    image, label = test[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and label == 0


def test_standard_cifar10_batches_folder(tmp_path, cifar_dir):
    """The python-version folder torchvision downloads: data_batch_1..5 and test_batch."""
    with np.load(cifar_dir / "test.npz") as f:
        x, y = f["x"][:60], f["y"][:60]
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    flat = x.transpose(0, 3, 1, 2).reshape(len(x), -1)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as fh:
            pickle.dump({"data": flat, "labels": y.tolist()}, fh)
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({"label_names": [str(i) for i in range(10)]}, fh)
    for spec in (f"cifar10:{tmp_path}", f"cifar10:{folder}"):
        ds = build_dataset(spec, train=False, transform=None)
        assert len(ds) == 60 and np.array_equal(np.asarray(ds[5][0]), x[5]) and ds[5][1] == y[5]
    assert len(build_dataset(f"cifar10:{tmp_path}", train=True)) == 300


def _image_folder(root, classes, per_class=3, size=40):
    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(np.full((size, size, 3), i * 40, np.uint8)).save(root / split / c / f"{i}.png")


def test_imagefolder_layout_and_transforms(tmp_path):
    _image_folder(tmp_path, ["cat", "dog"])
    val = eval_set(f"imagefolder:{tmp_path}", 32, MEAN, STD, 2)
    assert len(val) == 6 and val[0][0].shape == (3, 32, 32)
    train, held, idx = train_holdout(f"imagefolder:{tmp_path}", 96, MEAN, STD, 2, holdout=2, seed=0)
    assert len(train) == 4 and len(held) == 2 and len(idx) == 2
    assert train[0][0].shape == (3, 96, 96)  # random-resized crop to the input size


def test_holdout_is_seeded_and_disjoint():
    _, held_a, a = train_holdout("synthetic:100", 32, MEAN, STD, 10, holdout=20, seed=5)
    train_b, _, b = train_holdout("synthetic:100", 32, MEAN, STD, 10, holdout=20, seed=5)
    _, _, c = train_holdout("synthetic:100", 32, MEAN, STD, 10, holdout=20, seed=6)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert not set(a) & set(train_b.indices) and len(train_b) == 80
    with pytest.raises(CompressError, match="leaves no training images"):
        train_holdout("synthetic:10", 32, MEAN, STD, 10, holdout=10)


def test_bad_data_is_a_clear_error(tmp_path):
    with pytest.raises(CompressError, match="does not exist"):
        eval_set(f"imagefolder:{tmp_path / 'missing'}", 32, MEAN, STD, 10)
    _image_folder(tmp_path / "img", ["a", "b"])
    for f in (tmp_path / "img" / "val" / "b").iterdir():
        f.unlink()
    with pytest.raises(CompressError, match="image folder .*val.*one sub-folder of images per class"):
        eval_set(f"imagefolder:{tmp_path / 'img'}", 32, MEAN, STD, 10)
    np.savez(tmp_path / "keys.npz", images=np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(CompressError, match=r"must hold arrays 'x'.*it has \['images'\]"):
        eval_set(f"npz:{tmp_path / 'keys.npz'}", 32, MEAN, STD, 10)
    np.savez(tmp_path / "shape.npz", x=np.zeros((2, 8, 8), np.uint8), y=np.zeros(2, int))
    with pytest.raises(CompressError, match=r"'x' must be uint8 of shape \(N, H, W, 3\)"):
        eval_set(f"npz:{tmp_path / 'shape.npz'}", 32, MEAN, STD, 10)
    np.savez(tmp_path / "labels.npz", x=np.zeros((2, 8, 8, 3), np.uint8), y=np.array([0, 12]))
    with pytest.raises(CompressError, match="label 12 but the model has 10 classes"):
        eval_set(f"npz:{tmp_path / 'labels.npz'}", 32, MEAN, STD, 10)
    with pytest.raises(CompressError, match="neither train.npz/test.npz nor the standard"):
        eval_set(f"cifar10:{tmp_path}", 32, MEAN, STD, 10)
    with pytest.raises(CompressError, match="synthetic:N takes an image count"):
        eval_set("synthetic:many", 32, MEAN, STD, 10)


def test_train_transforms_augment_small_images():
    t = transforms(True, 32, MEAN, STD)
    image = torch.randint(0, 255, (3, 32, 32), dtype=torch.uint8)
    torch.manual_seed(0)
    outs = {tuple(t(image).flatten()[:50].tolist()) for _ in range(8)}
    assert len(outs) > 1  # pad-crop + flip vary


def test_small_images_upsampled_for_a_pretrained_net_are_not_cropped_like_photos(tmp_path):
    """CIFAR's 32 px images fed to a 96 px ImageNet net: evaluation sees the whole image
    resized (not a center crop that cuts 12% of a tiny picture) and training pads and crops
    rather than random-resized-cropping down to 8% of it."""
    from torchvision.transforms import v2
    from compress.data.specs import split
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.integers(0, 255, (4, 32, 32, 3), dtype=np.uint8), y=np.arange(4))
    evaluation = split(f"npz:{tmp_path / 'd.npz'}", False, 96, MEAN, STD)
    expected = v2.functional.resize(evaluation.x[0], [96], antialias=True).float() / 255
    expected = (expected - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
    assert torch.allclose(evaluation[0][0], expected, atol=1e-5)
    training = split(f"npz:{tmp_path / 'd.npz'}", True, 96, MEAN, STD)
    kinds = {type(t) for t in training.transform.transforms}
    assert v2.RandomCrop in kinds and v2.RandomResizedCrop not in kinds
    photos = transforms(True, 96, MEAN, STD)  # a folder of photos: size unknown, ImageNet recipe
    assert v2.RandomResizedCrop in {type(t) for t in photos.transforms}


def test_demo_finds_data_and_weights_from_env_then_beside_the_checkout(tmp_path, monkeypatch):
    """`make demo` runs the quickstart with what `python -m compress.app.demo` names: the user's
    own paths first, then the workplace's copies beside the checkout, then the downloads."""
    from compress.app.demo import demo_cifar10, demo_pretrained
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    monkeypatch.chdir(checkout)
    monkeypatch.setenv("COMPRESS_DATA", "/data/c10")
    monkeypatch.setenv("COMPRESS_PRETRAINED", "/weights/mnv2.pth")
    assert (demo_cifar10(), demo_pretrained()) == ("cifar10:/data/c10", "/weights/mnv2.pth")
    monkeypatch.delenv("COMPRESS_DATA")
    monkeypatch.delenv("COMPRESS_PRETRAINED")
    assert demo_pretrained() == "torchvision"
    (tmp_path / "shared" / "data" / "cifar10").mkdir(parents=True)
    (tmp_path / "shared" / "data" / "cifar10" / "train.npz").touch()
    (tmp_path / "shared" / "pretrained").mkdir()
    (tmp_path / "shared" / "pretrained" / "mobilenet_v2_imagenet.pth").touch()
    assert demo_cifar10() == "cifar10:../shared/data/cifar10"
    assert demo_pretrained() == "../shared/pretrained/mobilenet_v2_imagenet.pth"
