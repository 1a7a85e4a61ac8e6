// The plain 2D-canvas page: three planes of the base volume with overlays tinted on top, drawn from the server's
// uint8 resampling on one RAS display grid (/fallback/<k>.u8, described in /volumes.json). Neurological
// convention like the report: axial and coronal show patient left on the left, sagittal anterior on the right.
"use strict";
window.slicefieldFallback = async function (info, state, showLocation) {
  const g = info.grid;
  const [nx, ny, nz] = g.shape;
  const layers = [];
  for (const v of info.volumes) {
    const resp = await fetch(v.fallback);
    if (!resp.ok) throw new Error("cannot load " + v.fallback + ": HTTP " + resp.status);
    layers.push({
      data: new Uint8Array(await resp.arrayBuffer()),
      colormap: v.colormap,
      opacity: v.opacity,
      threshold: v.fallback_threshold || 0,
    });
  }
  const tints = { warm: [255, 140, 0], red: [255, 0, 0], green: [0, 255, 0], blue: [60, 120, 255], gray: [255, 255, 255] };
  const pos = [Math.floor(nx / 2), Math.floor(ny / 2), Math.floor(nz / 2)]; // voxel of the crosshair
  const at = (layer, x, y, z) => layer.data[x + nx * (y + ny * z)];
  // plane -> (width, height, image (col,row) -> voxel, voxel -> (col,row))
  const planes = {
    axial: [nx, ny, (c, r) => [c, ny - 1 - r, pos[2]], (p) => [p[0], ny - 1 - p[1]]],
    coronal: [nx, nz, (c, r) => [c, pos[1], nz - 1 - r], (p) => [p[0], nz - 1 - p[2]]],
    sagittal: [ny, nz, (c, r) => [pos[0], c, nz - 1 - r], (p) => [p[1], nz - 1 - p[2]]],
  };
  // display pixels per grid voxel: canvases about 512 pixels across, drawn without smoothing
  const scale = Math.max(1, Math.floor(512 / Math.max(nx, ny, nz)));
  const box = document.createElement("div");
  box.className = "planes";
  const canvases = {};
  const native = {};
  for (const name of Object.keys(planes)) {
    const c = document.createElement("canvas");
    c.dataset.plane = name;
    c.width = planes[name][0] * scale;
    c.height = planes[name][1] * scale;
    box.append(c);
    canvases[name] = c;
    native[name] = document.createElement("canvas");
    native[name].width = planes[name][0];
    native[name].height = planes[name][1];
  }
  document.getElementById("views").append(box);

  function draw() {
    for (const [name, [w, h, toVoxel, toImage]] of Object.entries(planes)) {
      const nctx = native[name].getContext("2d");
      const img = nctx.createImageData(w, h);
      for (let r = 0; r < h; r++) {
        for (let c = 0; c < w; c++) {
          const [x, y, z] = toVoxel(c, r);
          const base = at(layers[0], x, y, z);
          let rgb = [base, base, base];
          for (let k = 1; k < layers.length; k++) {
            const raw = at(layers[k], x, y, z);
            if (raw < layers[k].threshold) continue; // transparent below the overlay's threshold
            const v = raw / 255;
            const t = tints[layers[k].colormap] || tints.warm;
            const a = layers[k].opacity;
            rgb = rgb.map((b, i) => (1 - a) * b + a * v * t[i]);
          }
          const o = 4 * (r * w + c);
          img.data[o] = rgb[0];
          img.data[o + 1] = rgb[1];
          img.data[o + 2] = rgb[2];
          img.data[o + 3] = 255;
        }
      }
      nctx.putImageData(img, 0, 0);
      const ctx = canvases[name].getContext("2d");
      ctx.imageSmoothingEnabled = false;
      ctx.drawImage(native[name], 0, 0, w * scale, h * scale);
      const [cc, cr] = toImage(pos).map((v) => (v + 0.5) * scale);
      ctx.strokeStyle = "rgba(60,255,60,0.9)";
      ctx.lineWidth = 1;
      ctx.beginPath();
      ctx.moveTo(cc, 0);
      ctx.lineTo(cc, h * scale);
      ctx.moveTo(0, cr);
      ctx.lineTo(w * scale, cr);
      ctx.stroke();
    }
    const mm = pos.map((p, a) => (g.lo_mm[a] + (p + 0.5) * g.pixel_mm).toFixed(1));
    showLocation("x " + mm[0] + "  y " + mm[1] + "  z " + mm[2] + " mm (RAS)");
  }

  for (const [name, canvas] of Object.entries(canvases)) {
    canvas.addEventListener("click", (ev) => {
      // the canvas is shown with object-fit: contain, so its picture is letterboxed inside the element
      const rect = canvas.getBoundingClientRect();
      const [w, h] = planes[name];
      const shown = Math.min(rect.width / canvas.width, rect.height / canvas.height);
      const left = rect.left + (rect.width - canvas.width * shown) / 2;
      const top = rect.top + (rect.height - canvas.height * shown) / 2;
      const c = Math.floor((ev.clientX - left) / (shown * scale));
      const r = Math.floor((ev.clientY - top) / (shown * scale));
      if (c < 0 || r < 0 || c >= w || r >= h) return;
      const v = planes[name][2](c, r);
      pos[0] = v[0];
      pos[1] = v[1];
      pos[2] = v[2];
      draw();
    });
  }
  document.querySelector("footer").textContent =
    "Plain 2D page: three planes resampled on one RAS grid (neurological: patient left on the left), overlays " +
    "tinted on top. Click a slice to move the crosshair.";
  draw();
  state.crosshair = () => pos.map((p, a) => (p + 0.5) / g.shape[a]);
  state.tileCenter = (i, axCorSag) => {
    const rect = canvases[["axial", "coronal", "sagittal"][axCorSag]].getBoundingClientRect();
    return { x: rect.left + rect.width / 2, y: rect.top + rect.height / 2, w: rect.width, h: rect.height };
  };
};
