"""PACS integration: the DICOM node (C-STORE SCP, ``python -m services.pacs``), PACS jobs run by the Celery
worker (check -> load -> segment -> SEG -> post-check -> send), pull mode (C-FIND + C-MOVE/C-GET, QIDO + WADO),
routes, audit. Design and operator guide: docs/pacs.md. Needs the ``dicom`` extra (pydicom, pynetdicom,
highdicom), imported lazily so that the gateway and the worker start without it.
"""
