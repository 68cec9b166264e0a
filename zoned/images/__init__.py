"""The images a zone boots from, built on (or brought to) the host.

Built on the host:

- :mod:`zoned.images.bootimage`: the agent's boot image, an uncompressed
  cpio initramfs whose ``/init`` is the guest agent.
- :mod:`zoned.images.workloadroot`: the built-in workload root, a read-only
  EROFS image with busybox and the host's Python, used when a zone names no
  image.
- :mod:`zoned.images.hostfiles`: what both take from the host (busybox, the
  base interpreter, its stdlib, the shared-library closure by ``ldd``).

OCI images, in a content-addressed store, converted to one read-only EROFS
root filesystem per image:

- :mod:`zoned.images.store`: the store (blobs, converted roots, tags, locks,
  prune, sizes) and the import pipeline;
- :mod:`zoned.images.sources`: where images come from (a registry, an OCI
  layout, a ``docker save`` archive), fetched with Debian's ``skopeo``;
- :mod:`zoned.images.layers`: applying layers into a staging tree without
  ever following a link a layer made;
- :mod:`zoned.images.erofs`: the staging tree to an EROFS image;
- :mod:`zoned.images.oci`, :mod:`zoned.images.reference`: manifests,
  configs, references and platforms (pure);
- :mod:`zoned.images.imageconfig`: the process an image runs, by the
  container-runtime rules (pure);
- :mod:`zoned.images.default`: the default Debian image, from ``mmdebstrap``;
- :mod:`zoned.images.errors`, :mod:`zoned.images.progress`,
  :mod:`zoned.images.tools`: errors naming the image, progress and
  cancellation, host tools run as children that die with their caller.

Builders do blocking file and process work: the daemon calls them from
worker threads.
"""
