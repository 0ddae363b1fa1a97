import torch

from agent import metrics
from agent.classifiers import load_classifier
from agent.data import CIFAR_CLASSES, augment, to_float


def test_cifar_split_follows_the_protocol(cifar_train, cifar_test):
    assert len(cifar_train) == 8000 and len(cifar_test) == 2000
    assert cifar_train.images.dtype == torch.uint8 and cifar_train.images.shape[1:] == (3, 32, 32)
    # sorted paths: the held-back 2,000 are the last two class folders
    assert set(cifar_test.labels.tolist()) == {CIFAR_CLASSES.index("ship"), CIFAR_CLASSES.index("truck")}


def test_resnet20_port_matches_its_published_accuracy(cifar_test):
    """The option-A ResNet-20 must load the third-party weights and classify correctly."""
    classifier = load_classifier("cifar-resnet20")
    with torch.no_grad():
        predictions = classifier(to_float(cifar_test.images[:400])).argmax(1)
    assert metrics.accuracy(predictions, cifar_test.labels[:400]) > 0.88


def test_augmentation_is_reproducible_from_its_generator():
    images = torch.rand(6, 3, 8, 8)
    a = augment(images, torch.Generator().manual_seed(1))
    b = augment(images, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == images.shape


def test_photo_splits_follow_the_protocol():
    from agent.data import photo_paths, shared_dir

    if not (shared_dir() / "data" / "photos").exists():
        import pytest
        pytest.skip("../shared is not available")
    train, val, test = (photo_paths(split) for split in ("train", "imagenet-val", "bsds-test"))
    assert (len(train), len(val), len(test)) == (1100, 200, 200)
    assert not {p.name for p in train} & {p.name for p in val}
    assert sorted(val)[0].name > sorted(p for p in train if p.suffix == ".JPEG")[-1].name


def test_mobilenet_v2_classifies_the_centre_crops(imagenet_val):
    from agent.data import centre_crops

    crops = centre_crops(imagenet_val.subset(60))
    assert crops.images.shape == (60, 3, 224, 224)
    with torch.no_grad():
        predictions = load_classifier("imagenet-mobilenetv2")(to_float(crops.images)).argmax(1)
    # about 84% on all of imagenet-sample (../shared/README.md)
    assert metrics.accuracy(predictions, crops.labels) > 0.7


def test_random_crops_are_reproducible_and_sized():
    from agent.data import random_crops

    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8) for h, w in ((40, 60), (30, 30), (16, 50))]
    a = random_crops(images, 24, torch.Generator().manual_seed(2))
    b = random_crops(images, 24, torch.Generator().manual_seed(2))
    assert a.shape == (3, 3, 24, 24) and torch.equal(a, b)
    assert 0 <= a.min() and a.max() <= 1
