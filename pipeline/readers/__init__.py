"""readers: what is read back, before or after a run, without sending a request.

    estimate.py  INPUT's headers only → what a job would send, cost and take
    report.py    an out folder's rows → what a run did and spent, and what is left
    export.py    an out folder's latest rows → sidecar .txt, HF imagefolder, JSONL, CSV, Parquet
    review.py    an out folder's latest rows → one self-contained HTML page with thumbnails
    inputs.py    how the run that wrote an out folder read its INPUT (for the readers that read it again)

Readers follow the store's rules (`store.LatestRows`, `store.check_out_folder`) and find images
again through the input's source; none of them imports a driver or a provider.
"""
