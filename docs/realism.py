"""Measure the phantoms' realism figures (docs/phantoms.md) on 60 8-bit 1024^2 frames.

    python docs/realism.py normal
"""
import numpy as np, cv2, sys
from daemon import phantom as P
preset=sys.argv[1]
rows=[]
for s in range(60):
    ph=P.make_phantom(np.random.SeedSequence([777,s]), preset, (1024,1024), 8)
    sc=ph.scene; img=ph.image.astype(np.float32)
    m=P.invert_affine(sc.affine); y,x=np.mgrid[0:1024,0:1024]
    u=m[0,0]*x+m[0,1]*y+m[0,2]; v=m[1,0]*x+m[1,1]*y+m[1,2]
    ucmin=sc.u_end[sc.kind==1].min()
    body=np.median(img[(v>sc.v[0])&(v<sc.v[-1])&(u<ucmin-20)])
    T=P.transmission(sc); openb=cv2.erode((T>0.995).astype(np.uint8),np.ones((17,17),np.uint8)).astype(bool)
    if sc.imaging['fov'] is not None:
        cx,cy,r=sc.imaging['fov']; openb&=np.hypot(x-cx,y-cy)<r-30
    bg=np.median(img[openb])
    hp=img-cv2.GaussianBlur(img,(0,0),2.0)
    sel=openb&(img<250)
    noise=np.std(hp[sel]) if sel.sum()>1000 else np.nan
    # tab-end box: body edge (cathode min - 0.3 band) .. beyond tips
    band=sc.u_end.max()-ucmin
    u0,u1=ucmin-0.35*band, sc.u_end.max()+0.3*band
    v0,v1=sc.v[0]-sc.h[0], sc.v[-1]+sc.h[-1]
    W=1024
    rows.append([body,bg,noise,(u1-u0)/W,(v1-v0)/W,(v1-v0)/(u1-u0),(img<10).mean() if sc.imaging['fov'] else np.nan,(img>=255).mean(), len(sc.kind), np.median(np.diff(sc.v))])
r=np.array(rows)
names=["body grey","background grey","bg high-pass std","box w/W","box h/H","box h/w","black corners frac","clipped frac","layers","pitch px"]
for n,c in zip(names,r.T):
    c=c[np.isfinite(c)]
    print(f"{n:24s} median {np.median(c):7.3f}  p5 {np.percentile(c,5):7.3f}  p95 {np.percentile(c,95):7.3f}")
