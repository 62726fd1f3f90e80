//! Which variant of each linear-kernel family runs on this device, and why; the self-check that admits a
//! device-specific variant; a benchmark entry for one linear layer.
//!
//! A device-specific variant (tensor cores, subgroup reductions) was written where no such device was at hand, so it
//! must prove itself before it computes a token: the first time its family is needed (or when
//! [`Kernels::variants`] is asked), it runs a few small, awkwardly shaped problems (rows, columns and k not
//! multiples of its tiles, unaligned k, split-K) through itself and through the portable kernel. It is used only if
//! it compiles (under an error scope) and agrees within the rounding its inputs allow; otherwise the portable kernel
//! runs and the report says why. `STRATA_KERNELS=portable` or [`KernelOptions`] force the portable kernels. A CPU
//! adapter (lavapipe, where CI runs) uses the portable kernels unless a variant is forced, so CI's end-to-end runs
//! test the kernels every device has; unit tests force each variant and compare it with the CPU.

use std::fmt;
use std::sync::OnceLock;

use super::linear::{LinearCall, Variant};
use super::{ActDtype, Kernels, OutRows};
use crate::config::DType;
use crate::gpu::tensor::{GpuMatrix, WeightFormat};
use crate::gpu::GpuError;
use crate::weights::HostTensor;

/// How a family of kernels picks its variant.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Choice {
    /// The device-specific variant when the device has it and it passes the self-check, else portable.
    #[default]
    Auto,
    /// Always the portable kernel.
    Portable,
    /// The device-specific variant whenever the device has it and it compiles, without the self-check (tests
    /// compare it with the CPU themselves).
    Device,
}

/// What [`Kernels::with_options`] builds: the activation dtype and each family's variant choice.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelOptions {
    /// How activations are stored in every kernel that reads or writes them.
    pub act: ActDtype,
    /// The tiled linear kernels (prefill, decode of 9..=64 rows): tensor cores or portable.
    pub tiled: Choice,
    /// The decode GEMV (1..=8 rows): subgroup reduction or portable.
    pub gemv: Choice,
    /// Whether [`KernelOptions::from_env`] found `STRATA_KERNELS=portable` (for the report's reason).
    pub from_env: bool,
}

impl Default for KernelOptions {
    /// f32 activations; variants from [`KernelOptions::from_env`].
    fn default() -> Self {
        KernelOptions::from_env()
    }
}

impl KernelOptions {
    /// The environment variable that forces the portable kernels (`STRATA_KERNELS=portable`).
    pub const ENV: &'static str = "STRATA_KERNELS";

    /// f32 activations, every family on [`Choice::Auto`], unless `STRATA_KERNELS=portable`.
    pub fn from_env() -> Self {
        let portable = std::env::var(Self::ENV).is_ok_and(|v| v.eq_ignore_ascii_case("portable"));
        KernelOptions {
            act: ActDtype::F32,
            tiled: if portable {
                Choice::Portable
            } else {
                Choice::Auto
            },
            gemv: if portable {
                Choice::Portable
            } else {
                Choice::Auto
            },
            from_env: portable,
        }
    }

    /// Every family portable, f32 activations.
    pub fn portable() -> Self {
        KernelOptions {
            act: ActDtype::F32,
            tiled: Choice::Portable,
            gemv: Choice::Portable,
            from_env: false,
        }
    }

    /// These options with activations stored as `act`.
    pub fn with_act(self, act: ActDtype) -> Self {
        KernelOptions { act, ..self }
    }
}

/// A family of linear kernels that has a device-specific variant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Family {
    /// Decode of 1..=8 rows (`gemv.wgsl`): [`Variant::Subgroup`] or portable.
    Gemv,
    /// Prefill and decode of 9..=64 rows (`gemm.wgsl` / `gemm_coop.wgsl`): [`Variant::CoopMatrix`] (f16 and
    /// packed weights) or portable.
    Tiled,
}

impl Family {
    /// The device-specific variant of this family.
    pub fn device_variant(self) -> Variant {
        match self {
            Family::Gemv => Variant::Subgroup,
            Family::Tiled => Variant::CoopMatrix,
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Family::Gemv => "decode linear, 1-8 rows",
            Family::Tiled => "linear, 9+ rows (prefill; decode 9-64 rows)",
        }
    }
}

/// The variant one family uses and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FamilyChoice {
    /// The family.
    pub family: Family,
    /// The variant it runs.
    pub variant: Variant,
    /// Why: the self-check's result, or what the device lacks, or that it was forced.
    pub reason: String,
}

/// Which variant each family of kernels uses on this device, for `bench` and `profile` to print.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelReport {
    /// The adapter.
    pub adapter: String,
    /// How activations are stored.
    pub act: ActDtype,
    /// One entry per family.
    pub families: Vec<FamilyChoice>,
}

impl fmt::Display for KernelReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "kernels on {} ({:?} activations):",
            self.adapter, self.act
        )?;
        for c in &self.families {
            writeln!(
                f,
                "  {}: {} ({})",
                c.family.describe(),
                c.variant.name(),
                c.reason
            )?;
        }
        Ok(())
    }
}

/// Each family's choice, made once.
#[derive(Default)]
pub(super) struct Resolved {
    gemv: OnceLock<FamilyChoice>,
    tiled: OnceLock<FamilyChoice>,
}

impl Kernels {
    /// The options these kernels were built with.
    pub fn options(&self) -> KernelOptions {
        self.options
    }

    /// How activations are stored.
    pub fn act(&self) -> ActDtype {
        self.options.act
    }

    /// Which variant each family uses and why, running any self-check not run yet.
    pub fn variants(&self) -> KernelReport {
        KernelReport {
            adapter: self.gpu.describe(),
            act: self.options.act,
            families: [Family::Gemv, Family::Tiled]
                .into_iter()
                .map(|f| self.family_choice(f).clone())
                .collect(),
        }
    }

    /// The family's choice, resolved (and self-checked) on first use.
    pub fn family_choice(&self, family: Family) -> &FamilyChoice {
        let cell = match family {
            Family::Gemv => &self.resolved.gemv,
            Family::Tiled => &self.resolved.tiled,
        };
        cell.get_or_init(|| self.resolve(family))
    }

    /// Whether the automatic choice of `variant`'s family is `variant`.
    pub(super) fn chosen(&self, variant: Variant) -> bool {
        match variant {
            Variant::Portable => true,
            Variant::Subgroup => self.family_choice(Family::Gemv).variant == variant,
            Variant::CoopMatrix => self.family_choice(Family::Tiled).variant == variant,
        }
    }

    /// Whether this device has what `variant` needs (features, subgroup sizes, limits); `Err` says what is
    /// missing. Does not compile or run anything.
    pub fn variant_available(&self, variant: Variant) -> Result<(), String> {
        let gpu = &self.gpu;
        let (min, max) = (gpu.info.subgroup_min_size, gpu.info.subgroup_max_size);
        match variant {
            Variant::Portable => Ok(()),
            Variant::Subgroup => {
                if !gpu.features.contains(wgpu::Features::SUBGROUP) {
                    return Err("the adapter has no subgroup operations".into());
                }
                if !(max.is_power_of_two() && (4..=64).contains(&max) && min >= 4) {
                    return Err(format!(
                        "subgroups of {min}..={max} invocations; the GEMV's reduction needs 4..=64"
                    ));
                }
                Ok(())
            }
            Variant::CoopMatrix => {
                let wanted = wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX
                    | wgpu::Features::SUBGROUP
                    | wgpu::Features::SHADER_F16;
                if !gpu.features.contains(wanted) {
                    let missing: Vec<&str> = [
                        (
                            wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX,
                            "cooperative matrices",
                        ),
                        (wgpu::Features::SUBGROUP, "subgroups"),
                        (wgpu::Features::SHADER_F16, "shader-f16"),
                    ]
                    .into_iter()
                    .filter(|(f, _)| !gpu.features.contains(*f))
                    .map(|(_, name)| name)
                    .collect();
                    return Err(format!("the adapter lacks {}", missing.join(", ")));
                }
                let f16_f32 = gpu.cooperative_matrix.iter().any(|p| {
                    (p.m_size, p.n_size, p.k_size) == (16, 16, 16)
                        && p.ab_type == wgpu::CooperativeScalarType::F16
                        && p.cr_type == wgpu::CooperativeScalarType::F32
                });
                if !f16_f32 {
                    return Err(format!(
                        "no 16x16x16 f16 x f16 -> f32 cooperative matrix among {:?}",
                        gpu.cooperative_matrix
                    ));
                }
                if min != max {
                    return Err(format!(
                        "subgroup size varies ({min}..={max}); the tensor-core kernel needs one size"
                    ));
                }
                if self.coop_config(true).is_none() {
                    return Err(
                        "workgroup size or memory limits too small for the tensor-core tiles"
                            .into(),
                    );
                }
                Ok(())
            }
        }
    }

    fn resolve(&self, family: Family) -> FamilyChoice {
        let choice = match family {
            Family::Gemv => self.options.gemv,
            Family::Tiled => self.options.tiled,
        };
        let device = family.device_variant();
        let pick = |variant, reason: String| FamilyChoice {
            family,
            variant,
            reason,
        };
        if choice == Choice::Portable {
            let why = if self.options.from_env {
                format!("{}=portable", KernelOptions::ENV)
            } else {
                "forced portable".to_owned()
            };
            return pick(Variant::Portable, why);
        }
        if let Err(why) = self.variant_available(device) {
            return pick(Variant::Portable, format!("no {}: {why}", device.name()));
        }
        if choice == Choice::Device {
            return pick(device, "forced, self-check skipped".into());
        }
        if self.gpu.info.device_type == wgpu::DeviceType::Cpu {
            // A CPU driver (lavapipe in CI) runs the portable kernels end to end, so CI's end-to-end results are
            // the portable kernels' (tests force each variant where they compare it with the CPU).
            return pick(
                Variant::Portable,
                "CPU adapter: the portable kernels, as CI tests them end to end".into(),
            );
        }
        let key = (family, self.options.act);
        let cached = self
            .gpu
            .cache
            .choices
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
            .cloned();
        if let Some(found) = cached {
            return found;
        }
        let found = match self.self_check(family) {
            Ok(summary) => pick(device, format!("self-check passed: {summary}")),
            Err(why) => pick(
                Variant::Portable,
                format!("{} not used: {why}", device.name()),
            ),
        };
        self.gpu
            .cache
            .choices
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, found.clone());
        found
    }

    /// Runs the family's device-specific variant and the portable kernel on small awkward problems; `Ok` says how
    /// close they came, `Err` why the variant must not be used. [`Kernels::family_choice`] runs it once per device
    /// (with [`Choice::Auto`] on a GPU); tests call it directly.
    pub fn self_check(&self, family: Family) -> Result<String, String> {
        let device = family.device_variant();
        self.variant_available(device)?;
        let problems: &[(usize, usize, usize, WeightFormat)] = match family {
            Family::Gemv => &[
                (1, 37, 130, WeightFormat::F32),
                (5, 70, 256, WeightFormat::F16),
                (
                    8,
                    20,
                    64,
                    WeightFormat::Packed(crate::compress::CompressionConfig::DEFAULT),
                ),
            ],
            Family::Tiled => &[
                (77, 100, 200, WeightFormat::F16),
                (70, 65, 203, WeightFormat::F16),
                (40, 70, 1024, WeightFormat::F16),
                (9, 33, 66, WeightFormat::F16),
                (
                    20,
                    48,
                    128,
                    WeightFormat::Packed(crate::compress::CompressionConfig::DEFAULT),
                ),
            ],
        };
        let mut worst = 0.0f32;
        for &(m, n, k, format) in problems {
            let kernel = self.linear_kernel(m, n, format, Some(device));
            if kernel.variant() != device {
                return Err(format!("m={m} n={n} k={k} {format:?} would not run it"));
            }
            let problem = Problem::new(m, n, k, format);
            let err = |e: GpuError| format!("m={m} n={n} k={k}: {e}");
            let got = problem.run(self, Some(device)).map_err(err)?;
            let want = problem.run(self, Some(Variant::Portable)).map_err(err)?;
            // x (and the output, for f16 activations) rounded to f16 by one kernel and not the other, plus f32
            // summation order: a few f16 ulps of the sum of |terms|.
            let f16_inputs = device == Variant::CoopMatrix || self.options.act == ActDtype::F16;
            let rel = if f16_inputs { 2e-3 } else { 1e-5 };
            for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
                let bound = rel * (problem.magnitude[i] + w.abs()) + 1e-5;
                if !(g - w).abs().le(&bound) {
                    return Err(format!(
                        "m={m} n={n} k={k} {format:?}: output {i} is {g}, the portable kernel's {w}"
                    ));
                }
                worst = worst.max((g - w).abs() / bound);
            }
        }
        Ok(format!(
            "{} problems agree with the portable kernel (worst error {:.0}% of the bound)",
            problems.len(),
            100.0 * worst
        ))
    }
}

/// A small linear problem with seeded inputs, for the self-check.
struct Problem {
    m: usize,
    n: usize,
    k: usize,
    format: WeightFormat,
    x: Vec<f32>,
    w: Vec<f32>,
    /// Sum over k of |x| |w| per output (what rounding errors scale with).
    magnitude: Vec<f32>,
}

impl Problem {
    fn new(m: usize, n: usize, k: usize, format: WeightFormat) -> Problem {
        let mut state = (m * 1_000_003 + n * 1009 + k) as u64;
        let mut next = || {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        };
        let x: Vec<f32> = (0..m * k).map(|_| next()).collect();
        let w: Vec<f32> = (0..n * k).map(|_| next()).collect();
        let magnitude = (0..m * n)
            .map(|i| {
                let (r, c) = (i / n, i % n);
                (0..k).map(|j| (x[r * k + j] * w[c * k + j]).abs()).sum()
            })
            .collect();
        Problem {
            m,
            n,
            k,
            format,
            x,
            w,
            magnitude,
        }
    }

    /// The problem's output with `variant` forced (bias, GELU and a residual add included).
    fn run(&self, kernels: &Kernels, variant: Option<Variant>) -> Result<Vec<f32>, GpuError> {
        let gpu = &kernels.gpu;
        let act = kernels.options.act;
        let tensor = HostTensor {
            dtype: DType::F32,
            shape: vec![self.n, self.k],
            bytes: std::borrow::Cow::Borrowed(bytemuck::cast_slice(&self.w)),
        };
        let w = GpuMatrix::upload(gpu, "self-check weight", &tensor, self.format)?;
        let x = gpu.storage_buffer_init("self-check x", &encode_act(&self.x, act))?;
        let out = gpu.storage_buffer_init(
            "self-check out",
            &encode_act(&vec![0.0; self.m * self.n], act),
        )?;
        let mut rec = kernels.recorder();
        rec.linear_call(LinearCall {
            variant,
            ..LinearCall::new(&x, self.m, &w, None, &out, OutRows::dense(self.n, 0))
        });
        rec.submit();
        let bytes = gpu.read_back(&[(&out, 0, (self.m * self.n * act.bytes()) as u64)])?;
        Ok(decode_act(&bytes[0], act))
    }
}

/// `values` as activation storage of `act`.
pub fn encode_act(values: &[f32], act: ActDtype) -> Vec<u8> {
    match act {
        ActDtype::F32 => bytemuck::cast_slice(values).to_vec(),
        ActDtype::F16 => values
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
            .collect(),
    }
}

/// Activation storage of `act` as f32 values.
pub fn decode_act(bytes: &[u8], act: ActDtype) -> Vec<f32> {
    match act {
        ActDtype::F32 => bytemuck::pod_collect_to_vec(bytes),
        ActDtype::F16 => bytes
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
    }
}
