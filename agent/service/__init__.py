"""The agent's service layer: what a person does every day, on top of the pipeline, the key store
and the provenance log. The CLI and the local server are thin shells over it: each command calls
one public function here, and tests call them directly.

    home.py     the home folder, its lock, the log, users' keys, outputs, the errors
    users.py    users and their keys
    models.py   the shipped model and each user's own, encrypted
    batch.py    the files of a batch and their outputs' names
    protect.py  protecting files and uploads
    recover.py  recovering protected images and platform copies
    log.py      listing and verifying the log, checking an image

Formats: JPEG, PNG, WebP and (with pillow-heif) HEIC/HEIF in; the same format out. Outputs are
written atomically (temporary file, fsync, rename): a failed or interrupted file leaves no partial
output, and an original is never written. The batch functions do not stop at a bad file: each
file gets a result, with its error if it failed.
"""
