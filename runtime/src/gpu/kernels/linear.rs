//! Linear layers: which kernel computes `out (+)= act(x @ w^T + bias)` for a shape, the WGSL modules they are
//! assembled from, and their dispatch.
//!
//! Three kernels, each reading every weight format (f32, f16, packed 2/4/8-bit) through a weights part
//! (`weights_*.wgsl`) and x as activations (`act`) through an x part, all ending in `linear_common.wgsl`'s epilogue
//! (bias, activation, output placement, residual add):
//! - `gemv.wgsl`, m <= [`GEMV_MAX_ROWS`] (decode): lanes along k, every weight element read once for all rows,
//!   partial sums added by a workgroup tree or, where [`Variant::Subgroup`] proved itself, by `subgroupAdd`;
//! - `gemm.wgsl`, the portable tiled kernel: prefill, and decode batches of 9 to [`DECODE_MAX_ROWS`] rows with one
//!   row tile holding every row (each weight byte read once per dispatch) and the k range split over the grid when
//!   the column tiles alone would not fill the GPU ([`split_k`]; `splitk_reduce.wgsl` adds the ranges up);
//! - `gemm_coop.wgsl`, the same on tensor cores ([`Variant::CoopMatrix`]) for f16 and packed weights.
//!
//! A module is `act part + out_t alias + constants + x part + weights part + linear_common + kernel`
//! ([`compose`]); the pipelines are compiled on first use per [`PipelineKey`] and kept.

use std::collections::HashMap;
use std::sync::Mutex;

use super::{
    compile_kernel, u32_of, Act, ActDtype, Kernel, Kernels, OutRows, Recorder, SPLIT_K_SLOT,
};
use crate::gpu::tensor::{GpuMatrix, MatrixChunk, WeightFormat};
use crate::gpu::Gpu;

const LINEAR_COMMON: &str = include_str!("linear_common.wgsl");
const X_SCALAR: &str = include_str!("x_scalar.wgsl");
const X_VEC4: &str = include_str!("x_vec4.wgsl");
const WEIGHTS_F32: &str = include_str!("weights_f32.wgsl");
const WEIGHTS_F32X4: &str = include_str!("weights_f32x4.wgsl");
const WEIGHTS_F16: &str = include_str!("weights_f16.wgsl");
const WEIGHTS_F16X4: &str = include_str!("weights_f16x4.wgsl");
const WEIGHTS_PACKED: &str = include_str!("weights_packed.wgsl");
const GEMV: &str = include_str!("gemv.wgsl");
const REDUCE_WORKGROUP: &str = include_str!("reduce_workgroup.wgsl");
const REDUCE_SUBGROUP: &str = include_str!("reduce_subgroup.wgsl");
const GEMM: &str = include_str!("gemm.wgsl");
const GEMM_COOP: &str = include_str!("gemm_coop.wgsl");
const SPLITK_REDUCE: &str = include_str!("splitk_reduce.wgsl");
const GATHER: &str = include_str!("gather.wgsl");

/// Largest number of x rows the GEMV kernel handles (its registers); more rows use a tiled kernel.
pub const GEMV_MAX_ROWS: usize = 8;
/// Largest decode batch the tiled kernels cover with one row tile (each weight byte read once per dispatch) and may
/// split along k; larger row counts (prefill) use square tiles and no split.
pub const DECODE_MAX_ROWS: usize = 64;
/// Output columns per workgroup of every decode tile configuration (portable and tensor-core alike), so that
/// [`split_k`] and the scratch it needs do not depend on the variant.
const DECODE_TILE_COLUMNS: usize = 64;
/// Workgroups a split decode dispatch aims for: 4 per SM of a 132-SM GPU (H100 / H200), with room to spare.
pub const SPLIT_K_WORKGROUPS: usize = 512;
/// Fewest k elements a split range holds (shorter ranges cost more in partial sums than they gain).
const SPLIT_K_MIN: usize = 256;
/// A split range is a multiple of every tiled kernel's k step.
const SPLIT_K_ALIGN: usize = 64;
/// Words in a linear kernel's uniform (`Params` in linear_common.wgsl).
const PARAM_WORDS: usize = 20;

/// How a decode dispatch of one weight chunk splits its k range: `splits` ranges of `k_split` elements (the last
/// one shorter). `splits == 1` is no split (no scratch, no second pass).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SplitK {
    /// Number of k ranges (grid z).
    pub splits: usize,
    /// Elements per range, a multiple of 64.
    pub k_split: usize,
}

/// The split of a linear dispatch over `m` rows of x, a weight chunk of `n` rows and `k` columns: only decode
/// batches of 9..=[`DECODE_MAX_ROWS`] rows split, when their `ceil(n / 64)` column tiles are fewer than
/// [`SPLIT_K_WORKGROUPS`], into as many ranges as fill that many workgroups with at least 256 k elements each.
pub fn split_k(m: usize, n: usize, k: usize) -> SplitK {
    let none = SplitK {
        splits: 1,
        k_split: k.max(1),
    };
    if m <= GEMV_MAX_ROWS || m > DECODE_MAX_ROWS || k == 0 {
        return none;
    }
    let tiles = n.div_ceil(DECODE_TILE_COLUMNS).max(1);
    let wanted = (SPLIT_K_WORKGROUPS / tiles).min(k / SPLIT_K_MIN);
    if wanted <= 1 {
        return none;
    }
    let k_split = k.div_ceil(wanted).next_multiple_of(SPLIT_K_ALIGN);
    SplitK {
        splits: k.div_ceil(k_split),
        k_split,
    }
}

/// Bytes of split-K partial sums one dispatch needs: `splits * m * n` f32 when [`split_k`] splits, else 0. The
/// kernels keep one scratch buffer of the largest such size seen (a linear layer's chunks and layers reuse it; the
/// queue runs dispatches in order).
pub fn split_k_scratch_bytes(m: usize, n: usize, k: usize) -> u64 {
    let s = split_k(m, n, k);
    if s.splits > 1 {
        (s.splits * m * n * 4) as u64
    } else {
        0
    }
}

/// An upper bound of [`split_k_scratch_bytes`] over every weight shape for `m` rows of x: `splits * n <=
/// SPLIT_K_WORKGROUPS * 64`, so at most 8 MiB at m = 64.
pub fn max_split_k_scratch_bytes(m: usize) -> u64 {
    if m <= GEMV_MAX_ROWS || m > DECODE_MAX_ROWS {
        0
    } else {
        (SPLIT_K_WORKGROUPS * DECODE_TILE_COLUMNS * m * 4) as u64
    }
}

/// A kernel implementation that may be chosen for a family of linear kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Variant {
    /// Plain WGSL that runs on every adapter (what CI runs on lavapipe).
    Portable,
    /// The GEMV's partial sums added with subgroup operations (Features::SUBGROUP).
    Subgroup,
    /// Tensor cores through WGSL cooperative matrices (16 x 16 x 16, f16 inputs, f32 accumulation).
    CoopMatrix,
}

impl Variant {
    /// A short name for reports.
    pub fn name(self) -> &'static str {
        match self {
            Variant::Portable => "portable",
            Variant::Subgroup => "subgroup",
            Variant::CoopMatrix => "coop-matrix",
        }
    }
}

/// The kernels of a linear layer and their WGSL modules' tile constants.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LinearKernel {
    /// `gemv.wgsl` for `rows` rows of x, its sums added with subgroup operations when `subgroup`.
    Gemv {
        /// Rows of x (1..=8), a pipeline constant.
        rows: u8,
        /// [`Variant::Subgroup`]'s reduction.
        subgroup: bool,
    },
    /// `gemm.wgsl`.
    Tiled(TileConfig),
    /// `gemm_coop.wgsl`.
    Coop(CoopConfig),
}

impl LinearKernel {
    /// The variant this kernel is.
    pub fn variant(&self) -> Variant {
        match self {
            LinearKernel::Gemv { subgroup: true, .. } => Variant::Subgroup,
            LinearKernel::Gemv { .. } | LinearKernel::Tiled(_) => Variant::Portable,
            LinearKernel::Coop(_) => Variant::CoopMatrix,
        }
    }

    /// Output rows x columns of one workgroup.
    fn tile(&self) -> (usize, usize) {
        match self {
            LinearKernel::Gemv { rows, .. } => (*rows as usize, GEMV_COLUMNS),
            LinearKernel::Tiled(t) => (t.bm as usize, t.bn as usize),
            LinearKernel::Coop(c) => (c.bm() as usize, c.bn() as usize),
        }
    }
}

impl std::fmt::Display for LinearKernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LinearKernel::Gemv { rows, subgroup } => write!(
                f,
                "gemv m={rows} ({} reduction)",
                if *subgroup { "subgroup" } else { "workgroup" }
            ),
            LinearKernel::Tiled(t) => write!(
                f,
                "gemm {}x{}x{} tile, {}x{} per thread",
                t.bm, t.bn, t.bk, t.tm, t.tn
            ),
            LinearKernel::Coop(c) => write!(
                f,
                "coop-matrix gemm {}x{}x{} tile, {} subgroups of {}",
                c.bm(),
                c.bn(),
                c.bk,
                c.sg_m * c.sg_n,
                c.sg
            ),
        }
    }
}

/// Output columns per GEMV workgroup (`COLS` in gemv.wgsl).
const GEMV_COLUMNS: usize = 16;

/// `gemm.wgsl`'s tile constants: a `bm x bn` output tile per workgroup, k steps of `bk`, `tm x tn` outputs per
/// thread (multiples of 4), `(bm / tm) * (bn / tn)` threads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TileConfig {
    /// Rows of x per workgroup.
    pub bm: u32,
    /// Output columns per workgroup.
    pub bn: u32,
    /// k per step.
    pub bk: u32,
    /// Rows per thread.
    pub tm: u32,
    /// Columns per thread.
    pub tn: u32,
}

impl TileConfig {
    /// Prefill of shapes of at least 128 x 128: 128 x 128 tiles, k steps of 8, 8 x 8 per thread (the classic
    /// 128 x 128 x 8 SGEMM shape: 17 KiB of workgroup memory double-buffered, 64 multiply-adds per 4 vec4 reads).
    pub const LARGE: TileConfig = TileConfig::new(128, 128, 8, 8, 8);
    /// Prefill of small shapes (and devices with less workgroup memory): 64 x 64, 4 x 4 per thread.
    pub const SMALL: TileConfig = TileConfig::new(64, 64, 16, 4, 4);
    /// Prefill within 16 KiB of workgroup memory: 64 x 64, 8 x 8 per thread, k steps of 8.
    pub const SMALL_LOW_MEMORY: TileConfig = TileConfig::new(64, 64, 8, 8, 8);

    const fn new(bm: u32, bn: u32, bk: u32, tm: u32, tn: u32) -> TileConfig {
        TileConfig { bm, bn, bk, tm, tn }
    }

    /// A decode tile holding every one of `m` (<= 64) rows: 16, 32 or 64 rows by 64 columns.
    pub fn decode(m: usize, low_memory: bool) -> TileConfig {
        let bm = (m.next_power_of_two() as u32).clamp(16, DECODE_MAX_ROWS as u32);
        if low_memory {
            TileConfig::new(bm, DECODE_TILE_COLUMNS as u32, 8, 4, 8)
        } else {
            TileConfig::new(bm, DECODE_TILE_COLUMNS as u32, 16, 4, 4)
        }
    }

    /// Threads per workgroup.
    pub fn threads(&self) -> u32 {
        (self.bm / self.tm) * (self.bn / self.tn)
    }

    /// Workgroup memory: two buffers of k-major x and weight tiles, each row padded by a vec4.
    pub fn workgroup_bytes(&self) -> u32 {
        2 * self.bk * ((self.bm / 4 + 1) + (self.bn / 4 + 1)) * 16
    }

    /// Whether gemm.wgsl compiles with these constants on a device with `limits`: whole vec4 loads per thread and
    /// the device's workgroup size and memory.
    pub fn fits(&self, limits: &wgpu::Limits) -> bool {
        let threads = self.threads();
        self.tm % 4 == 0
            && self.tn % 4 == 0
            && threads > 0
            && (self.bm * self.bk / 4) % threads == 0
            && (self.bn * self.bk / 4) % threads == 0
            && threads <= limits.max_compute_invocations_per_workgroup
            && threads <= limits.max_compute_workgroup_size_x
            && self.workgroup_bytes() <= limits.max_compute_workgroup_storage_size
    }

    fn constants(&self) -> String {
        format!(
            "const BM: u32 = {}u;\nconst BN: u32 = {}u;\nconst BK: u32 = {}u;\nconst TM: u32 = {}u;\nconst TN: u32 = {}u;\n",
            self.bm, self.bn, self.bk, self.tm, self.tn
        )
    }
}

/// `gemm_coop.wgsl`'s constants: `sg_m x sg_n` subgroups of `sg` invocations, each with `fm x fn_` accumulator
/// fragments of 16 x 16, k steps of `bk`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CoopConfig {
    /// The device's subgroup size (its minimum and maximum must agree).
    pub sg: u32,
    /// Subgroups along the rows.
    pub sg_m: u32,
    /// Subgroups along the columns.
    pub sg_n: u32,
    /// 16-row fragments per subgroup.
    pub fm: u32,
    /// 16-column fragments per subgroup.
    pub fn_: u32,
    /// k per step (a multiple of 16).
    pub bk: u32,
}

impl CoopConfig {
    /// Prefill: 128 x 128 output tiles, 8 subgroups of 64 x 32.
    pub fn large(sg: u32) -> CoopConfig {
        CoopConfig {
            sg,
            sg_m: 2,
            sg_n: 4,
            fm: 4,
            fn_: 2,
            bk: 32,
        }
    }

    /// Decode (m <= 64): 64 x 64 output tiles, 4 subgroups of 32 x 32.
    pub fn decode(sg: u32) -> CoopConfig {
        CoopConfig {
            sg,
            sg_m: 2,
            sg_n: 2,
            fm: 2,
            fn_: 2,
            bk: 32,
        }
    }

    /// Rows of x per workgroup.
    pub fn bm(&self) -> u32 {
        self.sg_m * self.fm * 16
    }

    /// Output columns per workgroup.
    pub fn bn(&self) -> u32 {
        self.sg_n * self.fn_ * 16
    }

    /// Threads per workgroup.
    pub fn threads(&self) -> u32 {
        self.sg * self.sg_m * self.sg_n
    }

    /// Workgroup memory: two buffers of f16 x and weight tiles (rows padded by 8 halves), one f32 fragment per
    /// subgroup.
    pub fn workgroup_bytes(&self) -> u32 {
        2 * (self.bm() + self.bn()) * (self.bk + 8) * 2 + self.sg_m * self.sg_n * 1024
    }

    /// Whether gemm_coop.wgsl compiles with these constants on a device with `limits`.
    pub fn fits(&self, limits: &wgpu::Limits) -> bool {
        let threads = self.threads();
        threads > 0
            && self.bk % 16 == 0
            && (self.bm() * self.bk / 4) % threads == 0
            && (self.bn() * self.bk / 4) % threads == 0
            && threads <= limits.max_compute_invocations_per_workgroup
            && threads <= limits.max_compute_workgroup_size_x
            && self.workgroup_bytes() <= limits.max_compute_workgroup_storage_size
    }

    fn constants(&self) -> String {
        format!(
            "const SG: u32 = {}u;\nconst SG_M: u32 = {}u;\nconst SG_N: u32 = {}u;\nconst FM: u32 = {}u;\nconst FN: u32 = {}u;\nconst BK: u32 = {}u;\n",
            self.sg, self.sg_m, self.sg_n, self.fm, self.fn_, self.bk
        )
    }
}

/// How the weights part reads a matrix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WeightKind {
    /// f32 elements.
    F32,
    /// f16 pairs.
    F16,
    /// Group-wise quantised words of this many bits.
    Packed(u8),
}

impl From<WeightFormat> for WeightKind {
    fn from(format: WeightFormat) -> WeightKind {
        match format {
            WeightFormat::F32 => WeightKind::F32,
            WeightFormat::F16 => WeightKind::F16,
            WeightFormat::Packed(c) => WeightKind::Packed(c.bits),
        }
    }
}

/// What a linear-family module is made of (the kernels' act dtype aside).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ModuleKind {
    /// A linear kernel.
    Linear(LinearKernel),
    /// The split-K sum and epilogue.
    SplitKReduce,
    /// Embedding rows by id.
    Gather,
}

/// One pipeline of the linear family: the module and its specialisation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PipelineKey {
    /// The kernel.
    pub kind: ModuleKind,
    /// The weights part (unused by [`ModuleKind::SplitKReduce`]).
    pub weights: WeightKind,
    /// k is a multiple of 4: vec4 x and weight parts.
    pub aligned: bool,
    /// The output's storage type.
    pub out: OutDtype,
}

/// How a linear layer's output is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OutDtype {
    /// As the kernels' activations.
    Act,
    /// f32 whatever the activations are: logits (argmax and sampling read f32), an f32 KV cache.
    F32,
    /// IEEE halves whatever the activations are: an f16 KV cache written by the projection itself.
    F16,
}

impl OutDtype {
    /// The output dtype `dtype` for kernels whose activations are `act`: [`OutDtype::Act`] when they agree.
    pub fn of(dtype: ActDtype, act: ActDtype) -> OutDtype {
        match (dtype, act) {
            (a, b) if a == b => OutDtype::Act,
            (ActDtype::F32, _) => OutDtype::F32,
            (ActDtype::F16, _) => OutDtype::F16,
        }
    }

    /// The dtype this means for activations `act`.
    pub fn dtype(self, act: ActDtype) -> ActDtype {
        match self {
            OutDtype::Act => act,
            OutDtype::F32 => ActDtype::F32,
            OutDtype::F16 => ActDtype::F16,
        }
    }
}

/// The WGSL source and pipeline constants of `key`'s module for activations stored as `act`.
pub fn compose(act: ActDtype, key: &PipelineKey) -> (String, Vec<(&'static str, f64)>) {
    let mut source = String::new();
    // `enable` directives come first; the act part enables f16 itself for f16 activations.
    let coop = matches!(key.kind, ModuleKind::Linear(LinearKernel::Coop(_)));
    if coop {
        source.push_str("enable wgpu_cooperative_matrix;\n");
    }
    if act == ActDtype::F32 && (coop || key.out == OutDtype::F16) {
        source.push_str("enable f16;\n");
    }
    source.push_str(act.wgsl());
    source.push('\n');
    source.push_str(match key.out {
        OutDtype::Act => "alias out_t = act;\n",
        OutDtype::F32 => "alias out_t = f32;\n",
        OutDtype::F16 => "alias out_t = f16;\n",
    });
    source.push_str(&format!("const ALIGNED: bool = {};\n", key.aligned));
    let mut constants = Vec::new();
    let (x_part, body): (Option<&str>, &[&str]) = match key.kind {
        ModuleKind::Linear(LinearKernel::Gemv { rows, subgroup }) => {
            constants.push(("M", rows as f64));
            let reduce = if subgroup {
                REDUCE_SUBGROUP
            } else {
                REDUCE_WORKGROUP
            };
            (Some(x_part(key.aligned)), &[GEMV, reduce])
        }
        ModuleKind::Linear(LinearKernel::Tiled(t)) => {
            source.push_str(&t.constants());
            (Some(x_part(key.aligned)), &[GEMM])
        }
        ModuleKind::Linear(LinearKernel::Coop(c)) => {
            source.push_str(&c.constants());
            (Some(x_part(key.aligned)), &[GEMM_COOP])
        }
        ModuleKind::SplitKReduce => (None, &[SPLITK_REDUCE]),
        ModuleKind::Gather => (None, &[GATHER]),
    };
    if let Some(x) = x_part {
        source.push_str(x);
        source.push('\n');
    }
    if key.kind != ModuleKind::SplitKReduce {
        let weights = match (key.weights, key.aligned) {
            (WeightKind::F32, false) => WEIGHTS_F32,
            (WeightKind::F32, true) => WEIGHTS_F32X4,
            (WeightKind::F16, false) => WEIGHTS_F16,
            (WeightKind::F16, true) => WEIGHTS_F16X4,
            (WeightKind::Packed(bits), _) => {
                constants.push(("BITS", bits as f64));
                WEIGHTS_PACKED
            }
        };
        source.push_str(weights);
        source.push('\n');
    }
    source.push_str(LINEAR_COMMON);
    for part in body {
        source.push('\n');
        source.push_str(part);
    }
    (source, constants)
}

fn x_part(aligned: bool) -> &'static str {
    if aligned {
        X_VEC4
    } else {
        X_SCALAR
    }
}

/// The keys of every linear-family pipeline the runtime can build for activations `act` on a device with
/// subgroups of `subgroup_sizes` (the tensor-core kernels are built for those sizes): for tests that compile every
/// module.
pub fn all_pipeline_keys(subgroup_sizes: &[u32]) -> Vec<PipelineKey> {
    let weights = [
        WeightKind::F32,
        WeightKind::F16,
        WeightKind::Packed(2),
        WeightKind::Packed(4),
        WeightKind::Packed(8),
    ];
    let mut kernels = Vec::new();
    for rows in 1..=GEMV_MAX_ROWS as u8 {
        for subgroup in [false, true] {
            kernels.push(LinearKernel::Gemv { rows, subgroup });
        }
    }
    for t in [
        TileConfig::LARGE,
        TileConfig::SMALL,
        TileConfig::SMALL_LOW_MEMORY,
    ] {
        kernels.push(LinearKernel::Tiled(t));
    }
    for m in [16, 32, 64] {
        for low in [false, true] {
            kernels.push(LinearKernel::Tiled(TileConfig::decode(m, low)));
        }
    }
    for &sg in subgroup_sizes {
        kernels.push(LinearKernel::Coop(CoopConfig::large(sg)));
        kernels.push(LinearKernel::Coop(CoopConfig::decode(sg)));
    }
    let mut keys = Vec::new();
    for kernel in kernels {
        for weights in weights {
            for aligned in [false, true] {
                for out in [OutDtype::Act, OutDtype::F32, OutDtype::F16] {
                    keys.push(PipelineKey {
                        kind: ModuleKind::Linear(kernel),
                        weights,
                        aligned,
                        out,
                    });
                }
            }
        }
    }
    for out in [OutDtype::Act, OutDtype::F32, OutDtype::F16] {
        keys.push(PipelineKey {
            kind: ModuleKind::SplitKReduce,
            weights: WeightKind::F32,
            aligned: false,
            out,
        });
    }
    for weights in weights {
        keys.push(PipelineKey {
            kind: ModuleKind::Gather,
            weights,
            aligned: false,
            out: OutDtype::Act,
        });
    }
    keys
}

/// What the kernels of one device share, whichever [`Kernels`] built them (a run builds one per generator; tests
/// many): every compiled pipeline and each linear family's variant choice, so a pipeline compiles and a self-check
/// runs once per device and process. Held by [`Gpu`].
#[derive(Default)]
pub(crate) struct DeviceCache {
    /// Every other kernel ([`super::build_kernel`]), by entry point, constants and source.
    pub(super) modules: Mutex<HashMap<String, Kernel>>,
    /// Built on first use; `Err` when a device-specific module failed to compile (it is then never used).
    pipelines: Mutex<HashMap<(ActDtype, PipelineKey), Result<Kernel, String>>>,
    /// [`Choice::Auto`](super::Choice::Auto)'s choice per family and activation dtype.
    pub(super) choices: Mutex<HashMap<(super::Family, ActDtype), super::FamilyChoice>>,
}

impl DeviceCache {
    /// The pipeline of `key`, compiled on first use. Device-specific modules compile under an error scope, so a
    /// module the driver or wgpu rejects is an `Err` (and never used), not a crash.
    pub(super) fn pipeline(
        &self,
        gpu: &Gpu,
        act: ActDtype,
        key: PipelineKey,
    ) -> Result<Kernel, String> {
        if let Some(found) = self
            .pipelines
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&(act, key))
        {
            return found.clone();
        }
        // Compiled outside the lock: a self-check compiling its own pipelines may run meanwhile.
        let (source, constants) = compose(act, &key);
        let label = format!("{:?}", key.kind);
        let device_specific = match key.kind {
            ModuleKind::Linear(kernel) => kernel.variant() != Variant::Portable,
            _ => false,
        };
        let built = if device_specific {
            build_checked(gpu, &label, &source, &constants)
        } else {
            Ok(compile_kernel(gpu, &label, &[&source], "main", &constants))
        };
        self.pipelines
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry((act, key))
            .or_insert(built)
            .clone()
    }
}

/// Compiles a module under a validation error scope (and catching a panic of the shader translator), so a
/// device-specific kernel that does not compile here is reported instead of aborting the run.
fn build_checked(
    gpu: &Gpu,
    label: &str,
    source: &str,
    constants: &[(&str, f64)],
) -> Result<Kernel, String> {
    let scope = gpu.device.push_error_scope(wgpu::ErrorFilter::Validation);
    let built = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        compile_kernel(gpu, label, &[source], "main", constants)
    }));
    let error = pollster::block_on(scope.pop());
    match (built, error) {
        (Ok(kernel), None) => Ok(kernel),
        (_, Some(error)) => Err(format!("{label} does not compile: {error}")),
        (Err(_), None) => Err(format!("{label}: the shader translator panicked")),
    }
}

/// One linear layer for [`Recorder::linear_call`]: `out[r, c] (+)= act(x[r, :] . w[c, :] + bias[c])` for the `m`
/// rows of `x` (`[m, w.cols]` activations), output rows placed by `rows`.
#[derive(Clone, Copy, Debug)]
pub struct LinearCall<'a> {
    /// Input activations `[m, w.cols]`.
    pub x: &'a wgpu::Buffer,
    /// Rows of x.
    pub m: usize,
    /// The weight `[out, in]`.
    pub w: &'a GpuMatrix,
    /// f32 bias of `w.rows` values.
    pub bias: Option<&'a wgpu::Buffer>,
    /// Activation applied after the bias.
    pub act: Act,
    /// Output buffer.
    pub out: &'a wgpu::Buffer,
    /// Where output rows go.
    pub rows: OutRows,
    /// Add to the output's values (a residual add) instead of overwriting them.
    pub accumulate: bool,
    /// How `out` is stored: `None` as the kernels' activations; `Some(F32)` for logits; `Some(F16)` to write an f16
    /// KV cache straight from the projection (with [`OutRows::cache`]).
    pub out_dtype: Option<ActDtype>,
    /// Run this variant if the device has it (`None`: the kernels' own choice). For benchmarks and tests.
    pub variant: Option<Variant>,
    /// Run exactly this kernel (tile configuration included) if the device can (its variant available, its tiles
    /// within the device's limits); otherwise as if `None`. For benchmarks and tests; beats `variant`.
    pub kernel: Option<LinearKernel>,
}

impl<'a> LinearCall<'a> {
    /// `out = x . w^T + bias` for the `m` rows of `x`, placed by `rows`: no activation, no accumulation, output in
    /// the kernels' activation dtype, the kernels' own choice of kernel. Struct update syntax sets the rest.
    pub fn new(
        x: &'a wgpu::Buffer,
        m: usize,
        w: &'a GpuMatrix,
        bias: Option<&'a wgpu::Buffer>,
        out: &'a wgpu::Buffer,
        rows: OutRows,
    ) -> LinearCall<'a> {
        LinearCall {
            x,
            m,
            w,
            bias,
            act: Act::None,
            out,
            rows,
            accumulate: false,
            out_dtype: None,
            variant: None,
            kernel: None,
        }
    }
}

impl Kernels {
    /// The kernel a linear layer of `m` rows over a weight chunk of `n` rows in `format` runs, by the kernels' own
    /// choice (`variant: None`) or with `variant` forced where the device has it.
    pub fn linear_kernel(
        &self,
        m: usize,
        n: usize,
        format: WeightFormat,
        variant: Option<Variant>,
    ) -> LinearKernel {
        let limits = &self.gpu.limits;
        let low_memory = !TileConfig::decode(DECODE_MAX_ROWS, false).fits(limits);
        let wants = |v: Variant| match variant {
            Some(forced) => forced == v,
            None => self.chosen(v),
        };
        if m <= GEMV_MAX_ROWS && variant != Some(Variant::CoopMatrix) {
            let subgroup =
                wants(Variant::Subgroup) && self.variant_available(Variant::Subgroup).is_ok();
            return LinearKernel::Gemv {
                rows: m.clamp(1, GEMV_MAX_ROWS) as u8,
                subgroup,
            };
        }
        let decode = m <= DECODE_MAX_ROWS;
        // Tensor cores take f16 inputs: f32 weights (an f32 checkpoint) keep f32 arithmetic.
        if format != WeightFormat::F32
            && wants(Variant::CoopMatrix)
            && self.variant_available(Variant::CoopMatrix).is_ok()
        {
            if let Some(config) = self.coop_config(decode) {
                return LinearKernel::Coop(config);
            }
        }
        let tile = if decode {
            TileConfig::decode(m, low_memory)
        } else {
            let large = m >= 128 && n >= 128;
            [
                TileConfig::LARGE,
                TileConfig::SMALL,
                TileConfig::SMALL_LOW_MEMORY,
            ]
            .into_iter()
            .filter(|t| large || *t != TileConfig::LARGE)
            .find(|t| t.fits(limits))
            .unwrap_or(TileConfig::SMALL_LOW_MEMORY)
        };
        LinearKernel::Tiled(tile)
    }

    /// Whether `kernel` can run `m` rows on this device: its variant available, its tiles within the limits, a
    /// GEMV for exactly `m` rows.
    pub fn can_run(&self, kernel: LinearKernel, m: usize) -> bool {
        let limits = &self.gpu.limits;
        self.variant_available(kernel.variant()).is_ok()
            && match kernel {
                LinearKernel::Gemv { rows, .. } => rows as usize == m,
                LinearKernel::Tiled(t) => t.fits(limits),
                LinearKernel::Coop(c) => c.fits(limits) && c.sg == self.gpu.info.subgroup_max_size,
            }
    }

    /// The tensor-core configuration for decode or prefill shapes on this device, if one fits its limits.
    pub(super) fn coop_config(&self, decode: bool) -> Option<CoopConfig> {
        let sg = self.gpu.info.subgroup_max_size;
        let limits = &self.gpu.limits;
        let large = CoopConfig::large(sg);
        let small = CoopConfig::decode(sg);
        if decode {
            small.fits(limits).then_some(small)
        } else if large.fits(limits) {
            Some(large)
        } else {
            small.fits(limits).then_some(small)
        }
    }

    /// The largest split-K scratch a linear layer of `m` rows over `w` needs (its chunks share one buffer):
    /// [`split_k_scratch_bytes`] of its widest chunk.
    pub fn linear_scratch_bytes(m: usize, w: &GpuMatrix) -> u64 {
        w.chunks
            .iter()
            .map(|c| split_k_scratch_bytes(m, c.rows, w.cols))
            .max()
            .unwrap_or(0)
    }

    /// Bytes the kernels hold for split-K partial sums now (the largest dispatch so far).
    pub fn scratch_bytes(&self) -> u64 {
        self.staging_sizes()[SPLIT_K_SLOT]
    }
}

/// The linear kernels' uniform for one chunk.
#[allow(clippy::too_many_arguments)] // the parts of Params in linear_common.wgsl
fn linear_params(
    m: usize,
    w: &GpuMatrix,
    chunk: &MatrixChunk,
    rows: OutRows,
    has_bias: bool,
    act: Act,
    accumulate: bool,
    split: SplitK,
) -> [u32; PARAM_WORDS] {
    let layout = w.chunk_layout(chunk);
    let l = |f: fn(&crate::compress::PackedLayout) -> usize| {
        layout.as_ref().map_or(0, |l| u32_of(f(l)))
    };
    [
        u32_of(m),
        u32_of(chunk.rows),
        u32_of(w.cols),
        u32_of(chunk.row0),
        u32_of(rows.ldo),
        u32_of(rows.seg_len),
        u32_of(rows.seg_stride),
        u32_of(rows.seg_off),
        has_bias as u32,
        act.code(),
        accumulate as u32,
        u32_of(split.splits),
        u32_of(split.k_split),
        l(|l| l.words_per_row),
        l(|l| l.groups_per_row),
        l(|l| l.words_per_group),
        l(|l| l.scale_offset),
        0,
        0,
        0,
    ]
}

impl<'a> Recorder<'a> {
    /// A linear layer: `out[r, c] (+)= act(x[r, :] . w[c, :] + bias[c])` for the `m` rows of `x` (`[m, w.cols]`
    /// activations), output rows placed by `rows`, in the kernels' activation dtype. The GEMV serves
    /// `m <= 8`, a tiled kernel (portable or tensor cores) larger `m` ([`Kernels::linear_kernel`]).
    #[allow(clippy::too_many_arguments)] // one argument per part of the linear layer; LinearCall names them all
    pub fn linear(
        &mut self,
        x: &'a wgpu::Buffer,
        m: usize,
        w: &'a GpuMatrix,
        bias: Option<&'a wgpu::Buffer>,
        act: Act,
        out: &'a wgpu::Buffer,
        rows: OutRows,
        accumulate: bool,
    ) {
        self.linear_call(LinearCall {
            act,
            accumulate,
            ..LinearCall::new(x, m, w, bias, out, rows)
        });
    }

    /// Records one linear layer: per weight chunk one dispatch of the chosen kernel (and, when [`split_k`] splits,
    /// a second pass summing the partial sums into the epilogue).
    pub fn linear_call(&mut self, call: LinearCall<'a>) {
        let LinearCall { m, w, .. } = call;
        if m == 0 {
            return;
        }
        let kernels = self.kernels;
        let aligned = w.cols % 4 == 0;
        let out = call
            .out_dtype
            .map_or(OutDtype::Act, |d| OutDtype::of(d, kernels.options.act));
        for chunk in &w.chunks {
            let mut kernel = match call.kernel {
                Some(forced) if kernels.can_run(forced, m) => forced,
                _ => kernels.linear_kernel(m, chunk.rows, w.format, call.variant),
            };
            let key = |kernel| PipelineKey {
                kind: ModuleKind::Linear(kernel),
                weights: w.format.into(),
                aligned,
                out,
            };
            let pipeline =
                match kernels
                    .gpu
                    .cache
                    .pipeline(&kernels.gpu, kernels.options.act, key(kernel))
                {
                    Ok(p) => p,
                    // A device-specific module that does not compile here: the portable kernel instead (which always
                    // compiles).
                    Err(_) => {
                        kernel =
                            kernels.linear_kernel(m, chunk.rows, w.format, Some(Variant::Portable));
                        match kernels.gpu.cache.pipeline(
                            &kernels.gpu,
                            kernels.options.act,
                            key(kernel),
                        ) {
                            Ok(p) => p,
                            Err(_) => continue,
                        }
                    }
                };
            let split = match kernel {
                LinearKernel::Gemv { .. } => split_k(0, chunk.rows, w.cols),
                _ => split_k(m, chunk.rows, w.cols),
            };
            let params = linear_params(
                m,
                w,
                chunk,
                call.rows,
                call.bias.is_some(),
                call.act,
                call.accumulate,
                split,
            );
            let bias = call.bias.unwrap_or(&kernels.dummy);
            let (tile_m, tile_n) = kernel.tile();
            let mut bindings = vec![(1, &chunk.buffer), (2, call.x), (3, bias), (4, call.out)];
            // The tiled kernels bind the scratch even unsplit (a read-write binding may not share the read-only
            // dummy buffer): staging gives at least 16 bytes.
            let scratch = match kernel {
                LinearKernel::Gemv { .. } => None,
                _ => Some(
                    kernels.staging(SPLIT_K_SLOT, split_k_scratch_bytes(m, chunk.rows, w.cols)),
                ),
            };
            let groups = match (kernel, &scratch) {
                (LinearKernel::Gemv { .. }, _) | (_, None) => {
                    self.grid(chunk.rows.div_ceil(tile_n))
                }
                (_, Some(scratch)) => {
                    bindings.push((5, scratch));
                    let mut g = self.grid(m.div_ceil(tile_m) * chunk.rows.div_ceil(tile_n));
                    g[2] = u32_of(split.splits);
                    g
                }
            };
            self.dispatch_owned(pipeline, &params, bindings, groups);
            if let (true, Some(scratch)) = (split.splits > 1, &scratch) {
                let reduce = PipelineKey {
                    kind: ModuleKind::SplitKReduce,
                    weights: WeightKind::F32,
                    aligned: false,
                    out,
                };
                if let Ok(pipeline) =
                    kernels
                        .gpu
                        .cache
                        .pipeline(&kernels.gpu, kernels.options.act, reduce)
                {
                    let groups = self.grid((m * chunk.rows).div_ceil(256));
                    self.dispatch_owned(
                        pipeline,
                        &params,
                        vec![(3, bias), (4, call.out), (5, scratch)],
                        groups,
                    );
                }
            }
        }
    }

    /// `out[t, :] = table[ids[t], :]` (or `+=` when `accumulate`), for `n_ids` ids: embedding lookups, from f32,
    /// f16 or packed tables in any number of row chunks, into activations.
    pub fn gather(
        &mut self,
        table: &'a GpuMatrix,
        ids: &'a wgpu::Buffer,
        n_ids: usize,
        out: &'a wgpu::Buffer,
        accumulate: bool,
    ) {
        let kernels = self.kernels;
        let key = PipelineKey {
            kind: ModuleKind::Gather,
            weights: table.format.into(),
            aligned: false,
            out: OutDtype::Act,
        };
        let Ok(pipeline) = kernels
            .gpu
            .cache
            .pipeline(&kernels.gpu, kernels.options.act, key)
        else {
            return;
        };
        for chunk in &table.chunks {
            let params = linear_params(
                n_ids,
                table,
                chunk,
                OutRows::dense(table.cols, 0),
                false,
                Act::None,
                accumulate,
                split_k(0, 0, 0),
            );
            let groups = self.grid((n_ids * table.cols).div_ceil(256));
            self.dispatch_owned(
                pipeline.clone(),
                &params,
                vec![(1, &chunk.buffer), (2, ids), (4, out)],
                groups,
            );
        }
    }
}
