// Build and run on any machine with nvcc (no GPU needed), from the repository root:
//   nvcc -std=c++17 -arch=sm_90a $(python -c "import torch.utils.cpp_extension as c; print(' '.join('-I' + p for p in c.include_paths()))") \
//     -I svdquant_ops/csrc -I svdquant_ops/csrc/cuda --expt-relaxed-constexpr benchmarks/probes/w4a8_expand_check.cu \
//     -L $TORCH_LIB -lc10 -ltorch_cpu -Xlinker -rpath=$TORCH_LIB -o /tmp/x && /tmp/x   (TORCH_LIB: torch/lib; the headers pull in c10)
// Host check of the kKindW4a8Expand expansion: the smem image the three phases leave equals the 128-byte-swizzled
// int8 tile TMA would load from the prep kernel's B, and no phase reads a byte written in the same phase or later
// overwritten before it was read.
#include <cstdio>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>
#include <set>
#include "gemm/sm90.cuh"
using namespace svdquant::cuda_impl::gemm;
using svdquant::cuda_impl::gemm::sm90::expand_unit_sw128;
int main() {
  std::mt19937 rng(1);
  int bad = 0;
  for (int trial = 0; trial < 200; ++trial) {
    uint8_t codes[128][64], mult[128][2];
    for (int r = 0; r < 128; ++r) {
      for (int j = 0; j < 64; ++j) codes[r][j] = rng() & 0xFF;
      mult[r][0] = 1 + rng() % 18; mult[r][1] = 1 + rng() % 18;
    }
    // reference: int8 B[r][k] = sext(code) * m at W4A8's channel order (svdquant::w4a8_pos: per 32-channel slice
    // the even channels, then the odd ones), laid out with the 128B swizzle
    uint8_t ref[16384];
    for (int r = 0; r < 128; ++r)
      for (int k = 0; k < 128; ++k) {
        int nib = (codes[r][k / 2] >> (4 * (k & 1))) & 0xF;
        int v = (nib >= 8 ? nib - 16 : nib) * mult[r][k / 64];
        const int pos = static_cast<int>(svdquant::w4a8_pos(k));
        int j = pos / 16, b = pos % 16;
        ref[r * 128 + ((j ^ (r & 7)) * 16) + b] = uint8_t(v & 0xFF);
      }
    uint8_t sm[16384];
    memset(sm, 0xAB, sizeof sm);
    memcpy(sm + 8192, codes, 8192);
    auto m_of = [&](int u) { return uint32_t(mult[u >> 2][(u & 3) >> 1]); };
    auto ld = [&](int u) { uint4 c; memcpy(&c, sm + 8192 + u * 16, 16); return c; };
    // phases as the kernel runs them; within a phase every read happens before any write (worst case for the
    // check below is the opposite order, so also verify read/write byte sets are disjoint within a phase)
    auto phase = [&](std::vector<int> rd_only, std::vector<int> rd_write, std::vector<std::pair<int, uint4>> wr_saved,
                     std::vector<std::pair<int, uint4>>* save) {
      std::set<int> rd, wr;
      for (int u : rd_only) for (int i = 0; i < 16; ++i) rd.insert(8192 + u * 16 + i);
      for (int u : rd_write) for (int i = 0; i < 16; ++i) rd.insert(8192 + u * 16 + i);
      auto wbytes = [&](int u) { int r = u >> 2, q = u & 3; for (int h = 0; h < 2; ++h) for (int i = 0; i < 16; ++i)
                                   wr.insert(r * 128 + (((2 * q + h) ^ (r & 7)) * 16) + i); };
      for (int u : rd_write) wbytes(u);
      for (auto& p : wr_saved) wbytes(p.first);
      for (int x : rd) if (wr.count(x)) { printf("phase overlap at byte %d\n", x); return false; }
      if (save) for (int u : rd_only) save->push_back({u, ld(u)});
      std::vector<std::pair<int, uint4>> now;
      for (int u : rd_write) now.push_back({u, ld(u)});
      for (auto& p : now) expand_unit_sw128(sm, p.first, p.second, m_of(p.first));
      for (auto& p : wr_saved) expand_unit_sw128(sm, p.first, p.second, m_of(p.first));
      return true;
    };
    std::vector<int> r0, r1, r2;
    for (int u = 0; u < 256; ++u) r0.push_back(u);
    for (int u = 256; u < 384; ++u) r1.push_back(u);
    for (int u = 384; u < 512; ++u) r2.push_back(u);
    std::vector<std::pair<int, uint4>> h1, h2;
    bool ok = phase(r1, r0, {}, &h1) && phase(r2, {}, h1, &h2) && phase({}, {}, h2, nullptr);
    if (!ok || memcmp(sm, ref, 16384) != 0) { ++bad; if (bad < 3) printf("trial %d mismatch (ok=%d)\n", trial, ok); }
  }
  printf("%s: %d bad of 200\n", bad ? "FAIL" : "PASS", bad);
  return bad != 0;
}
