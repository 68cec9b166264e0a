"""The images a zone boots from, built on (or brought to) the host.

- :mod:`zoned.images.bootimage`: the agent's boot image, an uncompressed
  cpio initramfs whose ``/init`` is the guest agent.
- :mod:`zoned.images.workloadroot`: the built-in workload root, a read-only
  EROFS image with busybox and the host's Python, used when a zone names no
  image.
- :mod:`zoned.images.hostfiles`: what both take from the host (busybox, the
  base interpreter, its stdlib, the shared-library closure by ``ldd``).

OCI images (a store by digest, layers, sources, conversion to EROFS) join
them here. Builders do blocking file and process work: the daemon calls
them from worker threads.
"""
