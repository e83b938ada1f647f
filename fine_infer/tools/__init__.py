"""Tools built on everything below them (bundle, models, export, runtime, batching, index, serve):

- :mod:`~fine_infer.tools.bench`: latency and throughput of a bundle or a running server;
- :mod:`~fine_infer.tools.tune`: times the CPU paths of a bundle and stores the fastest gated one;
- :mod:`~fine_infer.tools.validate`: checksums, parity and the precision gates of a bundle's CPU paths;
- :mod:`~fine_infer.tools.evaluate`: the papers' retrieval protocols on the generated catalogue;
- :mod:`~fine_infer.tools.catalogue`, :mod:`~fine_infer.tools.demo`, :mod:`~fine_infer.tools.train`: the generated
  fashion catalogue, the demo, and the training of the shipped tiny weights.

Nothing below this package imports it; only :mod:`fine_infer.cli` sits above.
"""
