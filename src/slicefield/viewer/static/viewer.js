// slicefield view: NiiVue (three planes + 3D render, overlays, synced crosshairs), or the plain 2D-canvas page
// (fallback.js) when WebGL2 is missing or ?fallback=1 is asked for. window.slicefieldViewer exposes the state
// (mode, ready, crosshair) to tests and to the console.
"use strict";
(function () {
  const state = (window.slicefieldViewer = { mode: null, ready: false, error: null });

  function fail(message) {
    state.error = String(message);
    const div = document.createElement("div");
    div.id = "error";
    div.textContent = "viewer error: " + state.error;
    document.getElementById("views").replaceChildren(div);
  }

  function hasWebGL2() {
    try {
      return !!document.createElement("canvas").getContext("webgl2");
    } catch (e) {
      return false;
    }
  }

  function addView(label) {
    const view = document.createElement("div");
    view.className = "view";
    const caption = document.createElement("div");
    caption.className = "label";
    caption.textContent = label;
    const canvas = document.createElement("canvas");
    view.append(caption, canvas);
    document.getElementById("views").append(view);
    return canvas;
  }

  function showLocation(text) {
    document.getElementById("location").textContent = text;
  }

  async function startNiivue(info, layout) {
    const lib = window.niivue;
    const volumes = info.volumes;
    const options = {
      backColor: [0, 0, 0, 1],
      crosshairColor: [0.2, 1, 0.2, 1],
      show3Dcrosshair: true,
      multiplanarShowRender: lib.SHOW_RENDER.ALWAYS,
      multiplanarLayout: lib.MULTIPLANAR_TYPE.GRID, // 2 x 2: axial, coronal, sagittal, 3D render
      isRadiologicalConvention: false,
      logLevel: "warn",
    };
    const nvs = [];
    const groups = layout === "side" && volumes.length > 1 ? volumes.map((v) => [v]) : [volumes];
    for (const group of groups) {
      const canvas = addView(group.map((v) => v.name).join(" + "));
      const nv = new lib.Niivue(options);
      await nv.attachToCanvas(canvas);
      await nv.loadVolumes(
        group.map((v, k) => ({
          url: v.url,
          name: v.name,
          colormap: k === 0 ? "gray" : v.colormap,
          opacity: k === 0 ? 1 : v.opacity,
          // the first volume of a view is its base (full window); overlays start at the server's threshold
          cal_min: k === 0 ? v.window[0] : v.cal_min,
          cal_max: k === 0 ? v.window[1] : v.cal_max,
        })),
      );
      nv.setSliceType(nv.sliceTypeMultiplanar);
      nv.onLocationChange = (data) => showLocation(data && data.string ? data.string : "");
      nvs.push(nv);
    }
    for (const nv of nvs) {
      const others = nvs.filter((o) => o !== nv);
      if (others.length) nv.broadcastTo(others, { "2d": true, "3d": true });
    }
    if (groups.length === 1 && volumes.length > 1) {
      const control = document.getElementById("opacity-control");
      const slider = document.getElementById("opacity");
      slider.value = String(volumes[1].opacity);
      slider.addEventListener("input", () => {
        for (let k = 1; k < volumes.length; k++) nvs[0].setOpacity(k, Number(slider.value));
      });
      control.hidden = false;
    }
    state.nvs = nvs;
    state.crosshair = (i = 0) => Array.from(nvs[i].scene.crosshairPos);
    // the centre of a 2D tile (0 axial, 1 coronal, 2 sagittal) of view i, in page (CSS) pixels
    state.tileCenter = (i, axCorSag) => {
      const nv = nvs[i];
      const tile = nv.screenSlices.find((s) => s.axCorSag === axCorSag);
      if (!tile) return null;
      const [l, t, w, h] = tile.leftTopWidthHeight;
      const rect = nv.canvas.getBoundingClientRect();
      const dpr = nv.uiData.dpr || window.devicePixelRatio || 1;
      return { x: rect.left + (l + w / 2) / dpr, y: rect.top + (t + h / 2) / dpr, w: w / dpr, h: h / dpr };
    };
    state.mode = "niivue";
  }

  async function main() {
    const params = new URLSearchParams(window.location.search);
    const info = await (await fetch("/volumes.json")).json();
    document.getElementById("names").textContent = info.volumes.map((v) => v.name).join(" | ");
    const layout = params.get("layout") || info.layout;
    const forced = params.get("fallback") === "1";
    const switcher = document.getElementById("layout-switch");
    if (info.volumes.length > 1 && !forced) {
      const other = layout === "side" ? "overlay" : "side";
      switcher.textContent = other === "side" ? "side by side" : "overlaid";
      switcher.href = "?layout=" + other;
      switcher.hidden = false;
    }
    if (forced || !hasWebGL2() || !window.niivue) {
      switcher.hidden = true; // the plain page has one layout
      document.getElementById("mode").textContent = forced ? "plain 2D page" : "plain 2D page (no WebGL2 here)";
      await window.slicefieldFallback(info, state, showLocation);
      state.mode = "fallback";
    } else {
      await startNiivue(info, layout);
    }
    state.ready = true;
  }

  main().catch((e) => fail(e && e.message ? e.message : e));
})();
