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
