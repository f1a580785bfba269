import time, sys, torch
from ddpm.config import load_config
from ddpm.train import train
variants = [a.split(",") for a in sys.argv[1:]]
for v in variants:
    bs, *flags = v
    ov = [f"train.out_dir=runs/v_{'_'.join(v)}", "train.steps=300", f"train.batch_size={bs}", "train.log_every=50",
          "train.checkpoint_every=100000", "sample.num_images=16", "sample.steps=10"] + [f"train.{f}=true" for f in flags]
    cfg = load_config("params.yaml", "gpu", ov)
    t0 = time.time()
    try:
        r = train(cfg)
        rows = open(f"{cfg.train.out_dir}/loss.csv").read().splitlines()[1:]
        print(f"RESULT batch {bs} {flags}: last-window {r.images_per_sec:.0f} img/s, losses {[round(float(x.split(',')[1]),4) for x in rows]}, wall {time.time()-t0:.1f}s, peak {torch.cuda.max_memory_allocated()/2**30:.2f} GiB", flush=True)
    except Exception as e:
        print(f"RESULT batch {bs} {flags}: FAILED {type(e).__name__}: {e}", flush=True)
    torch.cuda.reset_peak_memory_stats()
