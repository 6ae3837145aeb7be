// common.wgsl: the declarations several kernel files share, defined once. main.ts appends this file to
// every kernel file it compiles (WGSL declarations may come in any order, so the line numbers in compiler
// messages stay the kernel file's own), and packs these uniform structs on the host by field name, read
// from here (packStruct): a field added, moved or retyped here needs no second edit in main.ts.
// Fields are 4-byte scalars (u32, i32, f32), padded to a multiple of 16 bytes (uniform buffer layout).

// Frame: the values a step (or an eval batch) changes, written once per submit by main.ts setFrame and
// bound as a uniform by data.wgsl, loss.wgsl, optim.wgsl, reduce.wgsl and muon.wgsl.
struct Frame {
  offset: u32, // first index into the epoch's permutation (training) or into the test set (evaluation)
  valid: u32, // rows of the batch that count in the loss and metrics
  lr_weights: f32, // learning rate of conv and linear weights at this step
  lr_biases: f32, // ... of batch-norm shifts
  ema_decay: f32,
  step: u32, // optimiser step number (0-based), for the non-finite-loss flag
  muon_lr: f32, // learning rate of the conv filters Muon trains (muon.wgsl), where a recipe uses it
  lr_whiten_bias: f32, // ... of the whitening bias (airbench94; 0 once it is frozen)
}

// ConvShape: the sizes of one conv pass (conv.wgsl, conv_tiled.wgsl). x [batch][h][w][cin],
// y [batch][ho][wo][cout], w [kh][kw][cin][cout]; the pass computes an m x n matrix of outputs;
// k_per_split: output pixels summed by one split of the backward weight.
struct ConvShape {
  batch: u32, h: u32, w: u32, cin: u32,
  ho: u32, wo: u32, cout: u32, kh: u32,
  kw: u32, pad: u32, m: u32, n: u32,
  k_per_split: u32, _p0: u32, _p1: u32, _p2: u32,
}
