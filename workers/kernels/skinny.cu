// Projections of 5..256 rows on Hopper (sm_90a): out[m][n] = x[m][:] · W[n][:] (bf16 operands,
// f32 result), at the rate of the weights' bytes. The `linear` contract of gemv.cu and cuBLAS.
//
// Why: at decode batch sizes the projections are memory-bound (the weights are read once per
// step), and cuBLAS ran them at 1.1-2.6 TB/s on the H100 (docs/benchmarks.md). An
// mma.sync kernel with 16 outputs per block lost to cuBLAS because each block re-read x
// (rows x K) for few weight rows. Here a block owns 128 output features, its x tile is shared
// by them through shared memory, and the K dimension is split over blocks so that even 4096
// outputs (32 tiles) fill 132 multiprocessors.
//
// The product is computed transposed ("swap AB"): outᵀ[n][m] = W[n][k] · xᵀ[k][m], so the
// weight is wgmma's A operand (64 features per warpgroup: wgmma's M is 64) and x the B operand
// with wgmma's N = the rows rounded up (SK_NP: 16..256). Both are K-major in shared memory
// (W's and x's rows are contiguous in K), copied by TMA in 64-element (128-byte) boxes in the
// 128-byte swizzle, which is also what wgmma reads (flash_wgmma.cu explains the layout). Rows of
// x past M are the TMA's zero fill, as are K past the end and W rows past N.
//
// A block: consumer warpgroups 0 and 1 (features 0-63 and 64-127 of its tile, one x tile for
// both) and producer warpgroup 2, of which one thread issues the TMA boxes into SK_STAGES
// shared-memory stages (full/empty mbarriers: flash_wgmma.cu's protocol). blockIdx.x is the
// tile of 128 features, blockIdx.y the split of K. With one split, each consumer thread writes
// its accumulators to `out`; with several, each block writes its partial tile to `partial` in
// fragment order (coalesced), and the last block of a tile to arrive (a counter per tile, reset
// by that block for the next launch) sums the splits' partials in split order and writes
// `out`: the result does not depend on which block finishes last, so it is the same at every
// run (no float atomics). The split count follows the weight's shape and the rows' width
// (skinny.rs), so, as with cuBLAS's choice of kernel, a row's outputs may differ in rounding
// between batch sizes.
//
// FP8 weights (`skinny_fp8_n*`): the same kernel over e4m3 codes of W and of x (x quantized per
// row beforehand, fp8.cu's `quantize_fp8_rows`), wgmma's e4m3 form (K 32 an instruction: a
// stage's 128 bytes a row are 128 inputs), both scales applied as the outputs are written.
// cuBLASLt's FP8 GEMM read these weights at about half the copy rate at decode sizes.
//
// Accumulator fragments (PTX ISA, wgmma .m64nNk16, D 64 x N): warp w of the warpgroup holds
// rows 16w..16w+15 (features here), g = lane / 4, c = lane % 4:
//   d[4j + 0/1] = (g, 8j + 2c + 0/1), d[4j + 2/3] = (g + 8, 8j + 2c + 0/1) (columns: x rows).

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

// wgmma with both operands in shared memory (descriptors), K-major: f32 += bf16 · bf16 (K 16 an
// instruction) and f32 += e4m3 · e4m3 (K 32: the same 32 bytes of each row), one per width
// the kernel is instantiated for (generated: the operand lists are long). The e4m3 form has
// no transpose operands: FP8 operands are K-major only.

__device__ __forceinline__ void wgmma_ss_n16(float* d, u64 a, u64 b, int scale_d) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %10, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n16k16.f32.bf16.bf16 {"
        "%0, %1, %2, %3, %4, %5, %6, %7 "
        "}, %8, %9, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7])
        : "l"(a), "l"(b), "r"(scale_d));
}

__device__ __forceinline__ void wgmma_ss_n32(float* d, u64 a, u64 b, int scale_d) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15 "
        "}, %16, %17, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
        : "l"(a), "l"(b), "r"(scale_d));
}

__device__ __forceinline__ void wgmma_ss_n64(float* d, u64 a, u64 b, int scale_d) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31 "
        "}, %32, %33, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "l"(a), "l"(b), "r"(scale_d));
}

__device__ __forceinline__ void wgmma_ss_n96(float* d, u64 a, u64 b, int scale_d) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %50, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n96k16.f32.bf16.bf16 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47 "
        "}, %48, %49, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
          "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
          "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47])
        : "l"(a), "l"(b), "r"(scale_d));
}

__device__ __forceinline__ void wgmma_ss_n128(float* d, u64 a, u64 b, int scale_d) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63 "
        "}, %64, %65, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
          "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
          "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
          "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(a), "l"(b), "r"(scale_d));
}

__device__ __forceinline__ void wgmma_ss_n192(float* d, u64 a, u64 b, int scale_d) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %98, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n192k16.f32.bf16.bf16 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, "
        "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, "
        "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95 "
        "}, %96, %97, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
          "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
          "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
          "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]),
          "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]),
          "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]),
          "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]),
          "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95])
        : "l"(a), "l"(b), "r"(scale_d));
}

__device__ __forceinline__ void wgmma_ss_n256(float* d, u64 a, u64 b, int scale_d) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, "
        "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, "
        "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, "
        "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, "
        "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127 "
        "}, %128, %129, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
          "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
          "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
          "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]),
          "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]),
          "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]),
          "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]),
          "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]),
          "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]),
          "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]),
          "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]),
          "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
        : "l"(a), "l"(b), "r"(scale_d));
}

__device__ __forceinline__ void wgmma_ss_fp8_n16(float* d, u64 a, u64 b, int scale_d) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %10, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n16k32.f32.e4m3.e4m3 {"
        "%0, %1, %2, %3, %4, %5, %6, %7 "
        "}, %8, %9, p, 1, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7])
        : "l"(a), "l"(b), "r"(scale_d));
}

__device__ __forceinline__ void wgmma_ss_fp8_n32(float* d, u64 a, u64 b, int scale_d) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n32k32.f32.e4m3.e4m3 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15 "
        "}, %16, %17, p, 1, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
        : "l"(a), "l"(b), "r"(scale_d));
}

__device__ __forceinline__ void wgmma_ss_fp8_n64(float* d, u64 a, u64 b, int scale_d) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k32.f32.e4m3.e4m3 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31 "
        "}, %32, %33, p, 1, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "l"(a), "l"(b), "r"(scale_d));
}

__device__ __forceinline__ void wgmma_ss_fp8_n96(float* d, u64 a, u64 b, int scale_d) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %50, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n96k32.f32.e4m3.e4m3 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47 "
        "}, %48, %49, p, 1, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
          "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
          "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47])
        : "l"(a), "l"(b), "r"(scale_d));
}

__device__ __forceinline__ void wgmma_ss_fp8_n128(float* d, u64 a, u64 b, int scale_d) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63 "
        "}, %64, %65, p, 1, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
          "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
          "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
          "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(a), "l"(b), "r"(scale_d));
}

__device__ __forceinline__ void wgmma_ss_fp8_n192(float* d, u64 a, u64 b, int scale_d) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %98, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n192k32.f32.e4m3.e4m3 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, "
        "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, "
        "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95 "
        "}, %96, %97, p, 1, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
          "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
          "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
          "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]),
          "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]),
          "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]),
          "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]),
          "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95])
        : "l"(a), "l"(b), "r"(scale_d));
}

__device__ __forceinline__ void wgmma_ss_fp8_n256(float* d, u64 a, u64 b, int scale_d) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n256k32.f32.e4m3.e4m3 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, "
        "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, "
        "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, "
        "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, "
        "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127 "
        "}, %128, %129, p, 1, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
          "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
          "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
          "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]),
          "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]),
          "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]),
          "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]),
          "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]),
          "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]),
          "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]),
          "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]),
          "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
        : "l"(a), "l"(b), "r"(scale_d));
}

// One instruction of 32 bytes of K per row: bf16 (16 elements) or e4m3 (32).
template <int NP, bool FP8>
__device__ __forceinline__ void wgmma_ss(float* d, u64 a, u64 b, int scale_d) {
    if constexpr (NP == 16) {
        if constexpr (FP8) wgmma_ss_fp8_n16(d, a, b, scale_d);
        else wgmma_ss_n16(d, a, b, scale_d);
    }
    else if constexpr (NP == 32) {
        if constexpr (FP8) wgmma_ss_fp8_n32(d, a, b, scale_d);
        else wgmma_ss_n32(d, a, b, scale_d);
    }
    else if constexpr (NP == 64) {
        if constexpr (FP8) wgmma_ss_fp8_n64(d, a, b, scale_d);
        else wgmma_ss_n64(d, a, b, scale_d);
    }
    else if constexpr (NP == 96) {
        if constexpr (FP8) wgmma_ss_fp8_n96(d, a, b, scale_d);
        else wgmma_ss_n96(d, a, b, scale_d);
    }
    else if constexpr (NP == 128) {
        if constexpr (FP8) wgmma_ss_fp8_n128(d, a, b, scale_d);
        else wgmma_ss_n128(d, a, b, scale_d);
    }
    else if constexpr (NP == 192) {
        if constexpr (FP8) wgmma_ss_fp8_n192(d, a, b, scale_d);
        else wgmma_ss_n192(d, a, b, scale_d);
    }
    else {
        if constexpr (FP8) wgmma_ss_fp8_n256(d, a, b, scale_d);
        else wgmma_ss_n256(d, a, b, scale_d);
    }
}

// A TMA tensor map (CUtensorMap: 128 bytes; 64-byte aligned for TMA, 128 in CUDA 13's
// headers, which this follows) passed by value as a `__grid_constant__` kernel parameter: the
// launch copies it with the other arguments (so does a CUDA graph's kernel node), and TMA reads
// it from the parameter space.
struct __align__(128) TmaMap {
    u64 words[16];
};

// One 2-D box of `map` (coordinates innermost first) into shared memory at `dst`, counted
// against `bar`'s transaction bytes.
__device__ __forceinline__ void tma_2d(u32 dst, const TmaMap* map, int c0, int c1, u32 bar) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes "
        "[%0], [%1, {%2, %3}], [%4];\n" ::"r"(dst),
        "l"(map), "r"(c0), "r"(c1), "r"(bar)
        : "memory");
}

// Features per block (two warpgroups of wgmma's 64), and the bytes of its W tile per stage.
#define SK_FEATURES 128
#define SK_W_BYTES (SK_FEATURES * 128)
#define SK_THREADS 384
// A stage: the W tile and NP rows of x, 64 K-elements (128 bytes) each. As many stages as fit
// in 200 KiB, at most 8 (kernels.rs's `skinny_stages` mirrors this).
#define SK_STAGE_BYTES(NP) (SK_W_BYTES + (NP) * 128)
#define SK_STAGES(NP) (SK_STAGE_BYTES(NP) * 8 <= 200 * 1024 ? 8 : (200 * 1024) / SK_STAGE_BYTES(NP))
#ifndef SK_PRODUCER_REGS
#define SK_PRODUCER_REGS 40
#endif
#ifndef SK_CONSUMER_REGS
#define SK_CONSUMER_REGS 232
#endif

// FP8: W and x are e4m3 codes (a step's 128 bytes are 128 inputs, not 64), and each output is
// scaled by its row's and its feature's scales (x_scales[m], w_scales[n]) as it is written.
template <int NP, bool FP8>
__device__ __forceinline__ void skinny_gemm(const TmaMap* wmap, const TmaMap* xmap,
                                            float* __restrict__ out, float* __restrict__ partial,
                                            u32* __restrict__ counters, int m, int n, int k_steps,
                                            int splits, int steps_per_split,
                                            const float* __restrict__ x_scales,
                                            const float* __restrict__ w_scales) {
    constexpr int STAGES = SK_STAGES(NP);
    constexpr int STAGE = SK_STAGE_BYTES(NP);
    constexpr int ACC = NP / 2;  // accumulator registers a consumer thread holds
    extern __shared__ __align__(16) unsigned char sk_smem[];
    // Swizzle atoms start 1024-byte aligned: the launch asks for 1 KiB more than the stages.
    const u32 raw = (u32)__cvta_generic_to_shared(sk_smem);
    const u32 base = (raw + 1023u) & ~1023u;
    __shared__ __align__(8) u64 full_bar[STAGES], empty_bar[STAGES];
    __shared__ int sk_last;
    const u32 full0 = (u32)__cvta_generic_to_shared(&full_bar[0]);
    const u32 empty0 = (u32)__cvta_generic_to_shared(&empty_bar[0]);
    const int tile = blockIdx.x, split = blockIdx.y;
    const int s0 = split * steps_per_split;
    // At least one step: the host picks splits so that none is empty.
    const int steps = min(k_steps, s0 + steps_per_split) - s0;
    if (threadIdx.x == 0) {
        for (int i = 0; i < STAGES; ++i) {
            mbar_init(full0 + 8 * i, 1);   // the producer's arrival with the stage's bytes
            mbar_init(empty0 + 8 * i, 8);  // lane 0 of each consumer warp
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();
    // The role from a value the compiler sees is warp-uniform (see flash_wgmma.cu).
    const int role = __shfl_sync(0xffffffffu, (int)(threadIdx.x >> 7), 0);
    if (role == 2) {
        asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(SK_PRODUCER_REGS));
        if (threadIdx.x != 256) return;
        int st = 0, use = 0;
        for (int i = 0; i < steps; ++i) {
            if (use > 0) mbar_wait(empty0 + 8 * st, (use - 1) & 1);
            const u32 bar = full0 + 8 * st;
            mbar_arrive_expect_tx(bar, STAGE);
            const u32 dst = base + st * STAGE;
            const int k0 = (s0 + i) * (FP8 ? 128 : 64);  // elements: 128 bytes either way
            tma_2d(dst, wmap, k0, tile * SK_FEATURES, bar);
            tma_2d(dst + SK_W_BYTES, xmap, k0, 0, bar);
            if (++st == STAGES) {
                st = 0;
                ++use;
            }
        }
        return;
    }
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(SK_CONSUMER_REGS));
    const int wg = role;
    const int lane = threadIdx.x & 31, wi = (threadIdx.x >> 5) & 3;
    const int g = lane >> 2, c = lane & 3;
    float acc[ACC];
#pragma unroll
    for (int i = 0; i < ACC; ++i) acc[i] = 0.0f;
    int st = 0, use = 0, prev = -1;
    for (int i = 0; i < steps; ++i) {
        mbar_wait(full0 + 8 * st, use & 1);
        const u32 a0 = base + st * STAGE + wg * 64 * 128;  // this warpgroup's 64 W rows
        const u32 b0 = base + st * STAGE + SK_W_BYTES;
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < 4; ++kk)
            wgmma_ss<NP, FP8>(acc, wg_desc(a0 + kk * 32, 16, 1024), wg_desc(b0 + kk * 32, 16, 1024), 1);
        wgmma_commit();
        wgmma_wait<1>();
#pragma unroll
        for (int j = 0; j < ACC; ++j) wgmma_hold(acc[j]);
        // The previous step's products are done: its stage goes back to the producer.
        if (prev >= 0) {
            __syncwarp();
            if (lane == 0) mbar_arrive(empty0 + 8 * prev);
        }
        prev = st;
        if (++st == STAGES) {
            st = 0;
            ++use;
        }
    }
    wgmma_wait<0>();
#pragma unroll
    for (int j = 0; j < ACC; ++j) wgmma_hold(acc[j]);

    if (splits > 1) {
        // This split's partial tile in fragment order: float4 q of consumer thread t at
        // [tile][split][q][t], so each store and load instruction is contiguous.
        const int t = threadIdx.x;  // 0..255: the consumers
        float4* mine = reinterpret_cast<float4*>(partial) + ((long long)tile * splits + split) * (ACC / 4) * 256;
#pragma unroll
        for (int q = 0; q < ACC / 4; ++q)
            __stcg(mine + q * 256 + t, make_float4(acc[4 * q], acc[4 * q + 1], acc[4 * q + 2], acc[4 * q + 3]));
        __threadfence();
        asm volatile("bar.sync 1, 256;\n" ::: "memory");
        if (t == 0) {
            const u32 arrived = atomicAdd(&counters[tile], 1u);
            const int last = arrived == (u32)(splits - 1);
            // Reset for the next launch (stream order: it starts after this one ends).
            if (last) atomicExch(&counters[tile], 0u);
            sk_last = last;
        }
        asm volatile("bar.sync 1, 256;\n" ::: "memory");
        if (!sk_last) return;
        __threadfence();
        const float4* all = reinterpret_cast<const float4*>(partial) + (long long)tile * splits * (ACC / 4) * 256;
#pragma unroll
        for (int q = 0; q < ACC / 4; ++q) {
            float4 s = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            for (int sp = 0; sp < splits; ++sp) {
                const float4 v = __ldcg(all + ((long long)sp * (ACC / 4) + q) * 256 + t);
                s.x += v.x;
                s.y += v.y;
                s.z += v.z;
                s.w += v.w;
            }
            acc[4 * q] = s.x;
            acc[4 * q + 1] = s.y;
            acc[4 * q + 2] = s.z;
            acc[4 * q + 3] = s.w;
        }
    }
    const int fa = tile * SK_FEATURES + wg * 64 + wi * 16 + g, fb = fa + 8;
    float sa = 1.0f, sb = 1.0f;
    if constexpr (FP8) {
        sa = fa < n ? w_scales[fa] : 0.0f;
        sb = fb < n ? w_scales[fb] : 0.0f;
    }
#pragma unroll
    for (int j = 0; j < NP / 8; ++j) {
        const int r = 8 * j + 2 * c;
        float x0 = 1.0f, x1 = 1.0f;
        if constexpr (FP8) {
            x0 = r < m ? x_scales[r] : 0.0f;
            x1 = r + 1 < m ? x_scales[r + 1] : 0.0f;
        }
        if (r < m) {
            if (fa < n) out[(long long)r * n + fa] = FP8 ? acc[4 * j] * (x0 * sa) : acc[4 * j];
            if (fb < n) out[(long long)r * n + fb] = FP8 ? acc[4 * j + 2] * (x0 * sb) : acc[4 * j + 2];
        }
        if (r + 1 < m) {
            if (fa < n) out[(long long)(r + 1) * n + fa] = FP8 ? acc[4 * j + 1] * (x1 * sa) : acc[4 * j + 1];
            if (fb < n) out[(long long)(r + 1) * n + fb] = FP8 ? acc[4 * j + 3] * (x1 * sb) : acc[4 * j + 3];
        }
    }
}

// The launch: grid (ceil(n / 128), splits), SK_THREADS threads, SK_STAGES(NP) *
// SK_STAGE_BYTES(NP) + 1024 bytes of dynamic shared memory. `wmap`: W as [n][k] bf16, boxes of
// 64 x 128; `xmap`: x as [m][k] bf16, boxes of 64 x NP; both in the 128-byte swizzle.
// `partial`: splits * ceil(n / 128) * 128 * NP floats (unused with one split); `counters`: one
// zero u32 per tile, left zero. `skinny_fp8_n*`: the same with W and x as e4m3 codes (boxes of
// 128 x 128 and 128 x NP bytes, `k_steps` steps of 128 inputs) and their f32 scales, one per
// feature of W and one per row of x.
#define SKINNY_KERNEL(NP)                                                                         \
    extern "C" __global__ void __launch_bounds__(SK_THREADS, 1) skinny_gemm_n##NP(                \
        const __grid_constant__ TmaMap wmap, const __grid_constant__ TmaMap xmap,                 \
        float* __restrict__ out, float* __restrict__ partial, u32* __restrict__ counters, int m,  \
        int n, int k_steps, int splits, int steps_per_split) {                                    \
        pdl_enter();                                                                              \
        skinny_gemm<NP, false>(&wmap, &xmap, out, partial, counters, m, n, k_steps, splits,       \
                               steps_per_split, nullptr, nullptr);                                \
    }                                                                                             \
    extern "C" __global__ void __launch_bounds__(SK_THREADS, 1) skinny_fp8_n##NP(                 \
        const __grid_constant__ TmaMap wmap, const __grid_constant__ TmaMap xmap,                 \
        float* __restrict__ out, float* __restrict__ partial, u32* __restrict__ counters, int m,  \
        int n, int k_steps, int splits, int steps_per_split, const float* __restrict__ x_scales,  \
        const float* __restrict__ w_scales) {                                                     \
        pdl_enter();                                                                              \
        skinny_gemm<NP, true>(&wmap, &xmap, out, partial, counters, m, n, k_steps, splits,        \
                              steps_per_split, x_scales, w_scales);                               \
    }

#else

// Not built for sm_90a: the symbols exist so the module loads the same everywhere; the host
// launches them only on a device it compiled the kernels for sm_90a for.
#define SKINNY_KERNEL(NP)                            \
    extern "C" __global__ void skinny_gemm_n##NP() {} \
    extern "C" __global__ void skinny_fp8_n##NP() {}

#endif

SKINNY_KERNEL(16)
SKINNY_KERNEL(32)
SKINNY_KERNEL(64)
SKINNY_KERNEL(96)
SKINNY_KERNEL(128)
SKINNY_KERNEL(192)
SKINNY_KERNEL(256)
