"""SimCLR learns on the real CIFAR-10: a few dozen steps of the small backbone
lift the kNN accuracy well above the randomly initialised network's.

Measured on a 2-core CPU (resnet_small, the first 2,048 training images as the
kNN bank, the full 10,000-image test set): random init (seed 0) 22.34%, after 64
steps at batch 64 (2 epochs, no warmup) 28.92% with the default recipe (+6.6 points;
29.67% with weight decay 1e-4, 29.18% with the BN-free head and mean loss). The test asks for
+3 points. Longer runs learn more: 234 steps at batch 128 on 5,000 images gave
34.79% against 25.98% for random init on that bank.
"""
import json
import os

from conftest import random_init_knn, run


def test_simclr_learns_on_cifar10(cifar10_dir, tmp_path):
    common = ["--data", "cifar10", "--data-dir", cifar10_dir, "--no-download", "--subset", "2048", "--workers", "2"]
    run(["simclr.py", *common, "--arch", "resnet_small", "--batch-size", "64", "--epochs", "2",
         "--warmup-epochs", "0", "--knn-every", "2", "--log-every", "32", "--out", str(tmp_path)], timeout=1200)
    with open(os.path.join(tmp_path, "log.jsonl")) as f:
        trained = [json.loads(line) for line in f][-1]["knn_top1"]
    random_init = random_init_knn(cifar10_dir, 2048)
    print(f"kNN top-1 on CIFAR-10: random init {random_init:.2f}%, after 64 SimCLR steps {trained:.2f}%")
    assert trained >= random_init + 3.0, (random_init, trained)
