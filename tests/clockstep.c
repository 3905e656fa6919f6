/* A wall-clock step for one process tree, for tests: LD_PRELOAD this library and set
 * CLOCKSTEP_FILE to a file holding one little-endian int64, nanoseconds added to
 * CLOCK_REALTIME (and gettimeofday, time) as long as the process runs. The file is mapped
 * shared, so rewriting it steps the clock of every process that loaded it at once.
 * CLOCK_MONOTONIC and CLOCK_BOOTTIME are untouched, as in a real NTP step.
 * Build: cc -shared -fPIC -O2 -o clockstep.so clockstep.c -ldl                        */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

static int (*real_clock_gettime)(clockid_t, struct timespec *);
static volatile const int64_t *offset;

static void setup(void) {
    if (real_clock_gettime)
        return;
    real_clock_gettime = (int (*)(clockid_t, struct timespec *))dlsym(RTLD_NEXT, "clock_gettime");
    const char *path = getenv("CLOCKSTEP_FILE");
    if (!path)
        return;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return;
    void *m = mmap(NULL, sizeof(int64_t), PROT_READ, MAP_SHARED, fd, 0);
    close(fd);
    if (m != MAP_FAILED)
        offset = (volatile const int64_t *)m;
}

__attribute__((constructor)) static void init(void) { setup(); }

int clock_gettime(clockid_t clk, struct timespec *ts) {
    setup();
    int r = real_clock_gettime(clk, ts);
    if (r == 0 && offset && (clk == CLOCK_REALTIME || clk == CLOCK_REALTIME_COARSE)) {
        int64_t ns = (int64_t)ts->tv_sec * 1000000000 + ts->tv_nsec + *offset;
        ts->tv_sec = ns / 1000000000;
        ts->tv_nsec = ns % 1000000000;
    }
    return r;
}

int gettimeofday(struct timeval *tv, void *tz) {
    (void)tz;
    struct timespec ts;
    int r = clock_gettime(CLOCK_REALTIME, &ts);
    if (r == 0 && tv) {
        tv->tv_sec = ts.tv_sec;
        tv->tv_usec = ts.tv_nsec / 1000;
    }
    return r;
}

time_t time(time_t *t) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    if (t)
        *t = ts.tv_sec;
    return ts.tv_sec;
}
