"""Data and geometry: volumes with their physical geometry, manifests, readers/writers and dataset layouts.

- ``volume``: :class:`Volume` (array indexed ``[x, y, z]`` plus spacing, origin, direction).
- ``manifest``: :class:`Case` and :class:`Manifest` (labeled / unlabeled / holdout roles).
- ``io``: one module owns SimpleITK and h5py: NIfTI, NRRD, MHA, DICOM series, LA h5.
- ``datasets``: manifest builders for the supported layouts and the validating ``load_case``.
- ``la``: the LA 2018 layout and its fetcher.
"""
