//! The frame of this layer's CPU kernels. Custom candle ops: f32 kernels over contiguous CPU
//! tensors, where an op says what it computes from its inputs' values and shapes ([`F32Op`]) and
//! [`F32Cpu`] makes it a candle `CustomOp2` or `CustomOp3`, turning each input's storage into its
//! values on the way in. And [`widest_simd`], which compiles one loop for the widest vectors the
//! CPU has.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape};

/// One input of an [`F32Op`]: its values, in row-major order, and its shape.
pub(crate) struct F32Input<'a> {
    /// The values.
    pub values: &'a [f32],
    /// The shape.
    pub shape: &'a Shape,
}

/// A CPU op from contiguous f32 inputs (two or three) to one f32 output.
pub(crate) trait F32Op: Send + Sync {
    /// The op's name, in candle's errors and in ours.
    fn name(&self) -> &'static str;

    /// The output's values and shape.
    fn forward(&self, inputs: &[F32Input<'_>]) -> candle_core::Result<(Vec<f32>, Shape)>;
}

/// An [`F32Op`] as a candle custom op: `a.apply_op2_no_bwd(&b, &F32Cpu(op))`.
pub(crate) struct F32Cpu<T>(pub T);

impl<T: F32Op> F32Cpu<T> {
    fn run(&self, inputs: &[(&CpuStorage, &Layout)]) -> candle_core::Result<(CpuStorage, Shape)> {
        let inputs = inputs
            .iter()
            .map(|&(s, l)| {
                Ok(F32Input {
                    values: contiguous_f32(self.0.name(), s, l)?,
                    shape: l.shape(),
                })
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let (values, shape) = self.0.forward(&inputs)?;
        Ok((CpuStorage::F32(values), shape))
    }
}

impl<T: F32Op> CustomOp2 for F32Cpu<T> {
    fn name(&self) -> &'static str {
        self.0.name()
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.run(&[(s1, l1), (s2, l2)])
    }
}

impl<T: F32Op> CustomOp3 for F32Cpu<T> {
    fn name(&self) -> &'static str {
        self.0.name()
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.run(&[(s1, l1), (s2, l2), (s3, l3)])
    }
}

/// The values of a contiguous f32 tensor in a custom op's storage; `op` names the op in errors.
fn contiguous_f32<'a>(op: &str, s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        candle_core::bail!("{op}: f32 only");
    };
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("{op}: contiguous inputs only");
    };
    Ok(&v[a..b])
}

/// `fn name(args) => generic`: defines `name`, which runs `generic(args)` (an `#[inline(always)]`
/// function) compiled for AVX-512F where the CPU has it and as it is elsewhere: one loop, written
/// to vectorise, gets 16 lanes where there are 16.
macro_rules! widest_simd {
    (
        $(#[$attr:meta])*
        $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) => $generic:ident
    ) => {
        $(#[$attr])*
        $vis fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx512f") {
                #[target_feature(enable = "avx512f")]
                unsafe fn avx512($($arg: $ty),*) {
                    $generic($($arg),*)
                }
                // SAFETY: the CPU has AVX-512F (checked just above).
                return unsafe { avx512($($arg),*) };
            }
            $generic($($arg),*)
        }
    };
}
pub(crate) use widest_simd;
