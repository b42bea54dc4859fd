"""The PACS side: DICOM listener (with its PDU limits and AE allowlist), durable spool, intake, retention,
result writers (SEG, SR, SC) and their files, delivery to destinations.

Imports the cascade and the store. Kept empty on purpose: `service.settings` validates the AE allowlist
through `service.pacs.allowlist`, which must not pull the listener in.
"""
