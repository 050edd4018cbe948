"""Grounding diagnostic: pre-train the default-size MLLM on a chosen sample mix and print, every --eval-every
steps, the teacher-forced VQA accuracy per question type (the argmax token after "answer:") on 100 training
and 100 test scenes of the built-in world. The instrument behind the README's "A model that sees" section.

  --mix default   train.py's pre-training stream (captions, packed VQA/POPE conversations, long captions, ...)
  --mix shape     colour and shape questions only, chunked in template order (4 turns), where the shape
                  question follows the colour question about the same object: the answer-leaking layout
                  that data.conversations avoids
  --mix vqa       the default stream's VQA / POPE conversations alone (no captions, stories or RAG)
  --distil N      N steps of stage 0's distillation of the tower from the teacher (train.distil_vision's loss,
                  here with AdamW's default betas and the test cosine printed), then frozen by --freeze 1
  --freeze-adapter 1   the adapter frozen too (its random initialisation); every 25 steps the log prints the
                  spread of the image tokens (mean distance from their mean / mean norm)

    python bench/grounding_diag.py --mix default --steps 400 --image 48 --patch 16 --distil 600
        --warm 0.05 --eval-every 200 --threads 1
"""
import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
import train as T  # noqa: E402
from unimllm import MLLM  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument('--mix', default='default', choices=['default', 'shape', 'vqa'])
p.add_argument('--steps', type=int, default=300)
p.add_argument('--batch', type=int, default=32)
p.add_argument('--lr', type=float, default=6e-4)
p.add_argument('--n', type=int, default=3000)
p.add_argument('--image', type=int, default=48)
p.add_argument('--patch', type=int, default=16)
p.add_argument('--vw', type=int, default=128)
p.add_argument('--vl', type=int, default=3)
p.add_argument('--eval-every', type=int, default=100)
p.add_argument('--threads', type=int, default=2)
p.add_argument('--warm', type=float, default=0.03)
p.add_argument('--distil', type=int, default=0)
p.add_argument('--dlr', type=float, default=1e-3)
p.add_argument('--freeze', type=int, default=1)
p.add_argument('--freeze-adapter', type=int, default=0)
a = p.parse_args()
torch.set_num_threads(a.threads)
torch.manual_seed(0)
cfg = T.TrainConfig()
cfg.model.image_size, cfg.model.patch_size = a.image, a.patch
cfg.model.vision_width, cfg.model.vision_layers = a.vw, a.vl
cfg.data.n_train = a.n
t0 = time.time()
corpus = T.builtin_corpus(cfg)
tok = data.train_tokenizer(corpus.texts, 1024)
test = data.make_world('test', 200, 0, image_size=a.image)
print('data', time.time() - t0, flush=True)
world = data.make_world('train', a.n, 0, image_size=a.image)
if a.mix == 'default':
    items = corpus.lm + corpus.long + corpus.stories
elif a.mix == 'vqa':  # the packed VQA / POPE conversations of the default stream alone
    items = [x for x in corpus.lm
             if any(g.kind == 'text' and g.text.startswith('question:') for g in x.segments)]
else:
    items = []
    for s in world.scenes:
        qa = s.vqa + s.pope
        qa = [x for x in qa if x[0].startswith('what shape') or x[0].startswith('what colour')]
        for k in range(0, len(qa), 4):
            segs = [data.image_seg(s.image)]
            for q, ans in qa[k:k+4]:
                segs += [data.text_seg(data.format_question(q), False), data.text_seg(ans, True)]
            items.append(data.Sample(segs))
print('items', len(items), flush=True)
model = MLLM(T.model_config(cfg.model, tok))
T.pretrain_trainable(model, vision_frozen=False)
if a.distil:
    head = torch.nn.Linear(a.vw, data.CROSS_DIM)
    dopt = torch.optim.AdamW(list(model.vision.parameters()) + list(head.parameters()), lr=a.dlr)
    imgs = torch.stack([s.image for s in world.scenes])
    tgt = torch.stack([s.cross_image for s in world.scenes])
    timgs = torch.stack([s.image for s in test.scenes])
    ttgt = torch.stack([s.cross_image for s in test.scenes])
    g = torch.Generator().manual_seed(0)
    td = time.time()
    for st in range(a.distil):
        for gr in dopt.param_groups: gr['lr'] = T.lr_at(st, a.distil, a.dlr, 0.05)
        idx = torch.randint(len(imgs), (64,), generator=g)
        loss = (1 - F.cosine_similarity(head(model.vision_features(imgs[idx]).mean(1)), tgt[idx])).mean()
        dopt.zero_grad(); loss.backward(); dopt.step()
        if st % 100 == 0 or st == a.distil - 1:
            with torch.no_grad():
                tc = F.cosine_similarity(head(model.vision_features(timgs).mean(1)), ttgt).mean()
            print(f'distil {st} loss {loss.item():.3f} test cos {tc:.3f} {time.time()-td:.0f}s', flush=True)
    if a.freeze:
        for p_ in model.vision.parameters(): p_.requires_grad_(False)
if a.freeze_adapter:
    for p_ in model.adapter.parameters(): p_.requires_grad_(False)
opt = T.make_optimizer(model, a.lr, 0.0)
stream = T.Stream('x', items, 0)
n_img = model.n_image_tokens

def qtype(q):
    return q.split()[1] if q.startswith('what') else ('count' if q.startswith('how')
                                                      else ('pope' if 'in the image' in q else 'rel'))

@torch.no_grad()
def evaluate(scenes):
    model.eval()
    qs = []
    for s in scenes:
        for q, ans in s.vqa + s.pope:
            qs.append((s, q, ans))
    by = {}
    for i in range(0, len(qs), 64):
        chunk = qs[i:i+64]
        samples = [data.Sample([data.image_seg(s.image), data.text_seg(data.format_question(q), False)])
                   for s, q, _ in chunk]
        b = data.collate(samples, tok, n_img, 192)
        logits, _ = model(b['input_ids'], b['images'])
        L = b['attention_mask'].sum(1) - 1
        last = logits[torch.arange(len(chunk)), L]
        for (s, q, ans), lg in zip(chunk, last):
            t = qtype(q)
            pred = tok.decode([int(lg.argmax())]).strip()
            by.setdefault(t, []).append(pred == ans)
    model.train()
    return {k: round(sum(v)/len(v), 3) for k, v in sorted(by.items())}

for step in range(a.steps):
    t1 = time.time()
    lr = T.lr_at(step, a.steps, a.lr, a.warm)
    for g in opt.param_groups: g['lr'] = lr
    b = data.collate(stream.batch(step, a.batch), tok, n_img, 192)
    pred = T.predicting(b['labels'])
    logits, _ = model(b['input_ids'], b['images'], pred)
    s, c = T.ntp_sum(logits, b['labels'], pred)
    loss = s / c
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step(); opt.zero_grad()
    if step % 25 == 0:
        with torch.no_grad():  # spread of the image tokens: does the adapter collapse them?
            tk = model.image_tokens(b['images'][:16]).flatten(0, 1)
            spread = (tk - tk.mean(0)).norm(dim=-1).mean() / tk.norm(dim=-1).mean()
        print(f'step {step} loss {loss.item():.3f} token spread {spread:.3f} {time.time()-t1:.2f}s',
              flush=True)
    if (step + 1) % a.eval_every == 0:
        print('train', evaluate(world.scenes[:100]), flush=True)
        print('test ', evaluate(test.scenes[:100]), flush=True)
