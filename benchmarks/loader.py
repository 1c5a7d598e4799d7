"""The Data layer (LMDB of Datums): records/s it delivers, and what it costs a training step.

1. images/s of the Data layer alone (layers.data.benchmark): read + decode + transform on the
   calling thread ("synchronous"), and through the prefetch thread ("prefetch").
2. LeNet training step (Net.run + Caffe SGD) with its Data layer against the same net fed one
   fixed batch through an Input layer: the difference is what the loader adds to a step (with
   prefetch it should be close to nothing, the batch being ready when the step asks for it).

Default data: configs/lenet/digits_train_lmdb (28x28 grey, 2000 records).
Usage: python benchmarks/loader.py [--source LMDB] [--batch 64] [--device cuda]
"""
import os

import common
from harness import finish_args, net_from_text, parser, report, run, trainer_step

NET = """
name: "LoaderLeNet"
layer { name: "data" type: "%(type)s" top: "data" top: "label"
  %(params)s }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  param { lr_mult: 1 } param { lr_mult: 2 }
  convolution_param { num_output: 20 kernel_size: 5 weight_filler { type: "xavier" } } }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "conv2" type: "Convolution" bottom: "pool1" top: "conv2"
  param { lr_mult: 1 } param { lr_mult: 2 }
  convolution_param { num_output: 50 kernel_size: 5 weight_filler { type: "xavier" } } }
layer { name: "pool2" type: "Pooling" bottom: "conv2" top: "pool2"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "ip1" type: "InnerProduct" bottom: "pool2" top: "ip1"
  param { lr_mult: 1 } param { lr_mult: 2 }
  inner_product_param { num_output: 500 weight_filler { type: "xavier" } } }
layer { name: "relu1" type: "ReLU" bottom: "ip1" top: "ip1" }
layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
  param { lr_mult: 1 } param { lr_mult: 2 }
  inner_product_param { num_output: 10 weight_filler { type: "xavier" } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" }
"""


def main():
    ap = parser(__doc__, batch_cpu=64, batch_gpu=64, iters_cpu=10, iters_gpu=100)
    ap.add_argument("--source", default=os.path.join(common.ROOT, "configs", "lenet",
                                                     "digits_train_lmdb"))
    ap.add_argument("--seconds", type=float, default=2.0, help="per Data layer rate figure")
    ap.add_argument("--prefetch", type=int, default=4)
    args = finish_args(ap.parse_args())
    from converters import glog
    from layers.data import benchmark
    print("Data layer on %s" % common.machine())
    benchmark(source=args.source, batch_size=args.batch, seconds=args.seconds,
              prefetch=args.prefetch)
    dev, b = args.device, args.batch
    glog.configure(min_level=1)       # no "Opened lmdb" / "Restarting data prefetching" lines
    with_loader = net_from_text(NET % {
        "type": "Data", "params": 'transform_param { scale: 0.00390625 } data_param { source: '
        '"%s" batch_size: %d backend: LMDB prefetch: %d }' % (args.source, b, args.prefetch)})
    with_loader.to(dev)
    layer = with_loader.layer_dict["data"]
    shape = with_loader.blob_shapes["data"]
    fixed = net_from_text(NET % {"type": "Input", "params": "input_param { shape { %s } "
                                 "shape { dim: %d } }" % (" ".join("dim: %d" % d for d in shape),
                                                          b)}).to(dev)
    data, label = layer.forward()       # one real batch, fed again and again
    fixed_step = trainer_step(fixed, {"data": data.to(dev), "label": label.to(dev)})
    loader_step = trainer_step(with_loader, None)
    result = run([("step with the Data layer", loader_step),
                  ("step on a fixed batch (Input)", fixed_step)], args)
    report("LeNet training step, batch %d %s" % (b, "x".join(map(str, shape[1:]))), result, b,
           [("step with the Data layer", "step on a fixed batch (Input)")])
    layer.close()


if __name__ == "__main__":
    main()
