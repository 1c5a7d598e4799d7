#!/usr/bin/env python3
"""Write the tiny paired data set of the shared-weights example (seed 002).

Each record is a Caffe ``Datum`` of shape 2 x 1 x 16 (uint8): two noisy views ``a`` and ``b``
of one of ten random 16-value prototypes, and the prototype's index as the label. The net slices
the two channels into ``data_a`` and ``data_b``, and both go through the same InnerProduct weights
(``ip1_w`` / ``ip1_b``). 1000 training and 200 test records, keys ``%08d``, one seeded generator:
the same bytes on every run. Written next to this script:

    python configs/shared_weights/make_pairs_lmdb.py
"""
import os
import shutil
import sys

import lmdb
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

SEED = 20160304
CLASSES, WIDTH = 10, 16


def write(path, records):
    if os.path.exists(path):
        shutil.rmtree(path)
    env = lmdb.open(path, map_size=1 << 24, subdir=True)
    with env.begin(write=True) as txn:
        for i, value in enumerate(records):
            txn.put(b"%08d" % i, value)
    env.close()
    lock = os.path.join(path, "lock.mdb")
    if os.path.exists(lock):
        os.remove(lock)


def main():
    from converters.datum import make_datum
    rng = np.random.Generator(np.random.PCG64(SEED))
    prototypes = rng.uniform(40, 215, size=(CLASSES, WIDTH))
    for name, n in (("pairs_train_lmdb", 1000), ("pairs_test_lmdb", 200)):
        records = []
        for i in range(n):
            label = int(rng.integers(0, CLASSES))
            views = prototypes[label] + rng.normal(0, 30, size=(2, WIDTH))
            arr = np.clip(np.rint(views), 0, 255).astype(np.uint8).reshape(2, 1, WIDTH)
            records.append(make_datum(arr, label).SerializeToString())
        write(os.path.join(HERE, name), records)
    print("wrote %s/pairs_{train,test}_lmdb" % HERE)


if __name__ == "__main__":
    main()
