@echo off
rem Quick checks on your own machine after "pip install .[qt]" (Windows cmd):
rem   [1/4] start "collab-trio serve" on 127.0.0.1:PORT
rem   [2/4] the PyQt6 smoke client against it (tools\qt_smoke_client.py)
rem   [3/4] the multi-client integration run against it (tools\collab_integration.py --url)
rem   [4/4] stop the server (taskkill) and check that the port can be bound again
rem
rem Usage: tools\run_tests.bat [PORT]   or   tools\run_tests.bat --port PORT
rem   PORT defaults to 8765 (1-65535; use tools/run_tests.sh for a free port, 0).
rem   "set PYTHON=C:\path\to\python.exe" selects the interpreter (default: python).
rem Exits 0 only when every check passes; the server is always stopped.
rem Ctrl+C reaches the server too (it shuts down); answer Y to end this script.
setlocal EnableExtensions DisableDelayedExpansion

set "PORT=8765"
if "%~1"=="" goto args_done
if /i "%~1"=="-h" goto usage
if /i "%~1"=="--help" goto usage
if /i "%~1"=="--port" goto port_option
set "PORT=%~1"
if not "%~2"=="" goto bad_args
goto args_done
:port_option
set "PORT=%~2"
if not "%~3"=="" goto bad_args
:args_done

rem The port must be 1 to 65535, digits only.
if "%PORT%"=="" goto bad_port
set "NONDIGIT="
for /f "delims=0123456789" %%c in ("%PORT%") do set "NONDIGIT=%%c"
if defined NONDIGIT goto bad_port
if "%PORT:~5%" neq "" goto bad_port
if %PORT% LSS 1 goto bad_port
if %PORT% GTR 65535 goto bad_port

if not defined PYTHON set "PYTHON=python"
if not defined QT_QPA_PLATFORM set "QT_QPA_PLATFORM=offscreen"
set "PYTHONUNBUFFERED=1"
set "ROOT=%~dp0.."
set "URL=ws://127.0.0.1:%PORT%"
set "R1=skipped"
set "R2=skipped"
set "R3=skipped"
set "R4=skipped"
set "SERVER_PID="
set "WORK="

"%PYTHON%" -c "import collab_trio, PyQt6.QtWebSockets" >nul 2>&1
if errorlevel 1 goto not_installed
echo collab-trio quick checks with %PYTHON%:
"%PYTHON%" -m collab_trio --version

set "WORK=%TEMP%\collab-trio-checks-%RANDOM%%RANDOM%"
mkdir "%WORK%" || goto no_workdir
set "LOG=%WORK%\server.log"
rem A server that stores sessions on disk keeps them in this throwaway directory.
set "COLLAB_TRIO_DATA_DIR=%WORK%\collab-data"

rem ---- [1/4] start the server -----------------------------------------------
echo [1/4] starting server on 127.0.0.1 port %PORT% ...
rem Python starts it in the background and writes its process id to a file.
"%PYTHON%" -c "import os, subprocess, sys; work = sys.argv[2]; log = open(os.path.join(work, 'server.log'), 'w'); p = subprocess.Popen([sys.executable, '-m', 'collab_trio', 'serve', '--host', '127.0.0.1', '--port', sys.argv[1]], cwd=work, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT); open(os.path.join(work, 'server.pid'), 'w').write(str(p.pid))" %PORT% "%WORK%"
if errorlevel 1 goto start_failed
if not exist "%WORK%\server.pid" goto start_failed
set /p SERVER_PID=<"%WORK%\server.pid"

rem Wait at most about 20 s for the "Listening on" line; ping -n 2 waits about 1 s.
set /a TRIES=0
:wait_listening
findstr /c:"Listening on ws://" "%LOG%" >nul 2>&1
if not errorlevel 1 goto listening
call :server_running
if errorlevel 1 goto start_exited
set /a TRIES+=1
if %TRIES% geq 20 goto start_timeout
ping -n 2 127.0.0.1 >nul
goto wait_listening

:listening
echo [1/4] starting server ... ok: %URL% (pid %SERVER_PID%)
set "R1=ok"

rem ---- [2/4] the Qt smoke client --------------------------------------------
echo [2/4] Qt smoke client: tools\qt_smoke_client.py %URL% --duration 5 --interval 1
"%PYTHON%" "%ROOT%\tools\qt_smoke_client.py" %URL% --duration 5 --interval 1
if errorlevel 1 (
    set "R2=FAILED"
    echo [2/4] Qt smoke client ... FAILED
) else (
    set "R2=ok"
    echo [2/4] Qt smoke client ... ok
)

rem ---- [3/4] the integration run --------------------------------------------
call :server_running
if errorlevel 1 goto server_gone
echo [3/4] integration: tools\collab_integration.py --url %URL%
"%PYTHON%" "%ROOT%\tools\collab_integration.py" --url %URL%
if errorlevel 1 (
    set "R3=FAILED"
    echo [3/4] integration ... FAILED
) else (
    set "R3=ok"
    echo [3/4] integration ... ok
)

rem ---- [4/4] stop the server and check the port ------------------------------
call :server_running
if errorlevel 1 goto server_gone
echo [4/4] stopping server with taskkill ...
call :stop_server
if defined SERVER_PID (
    set "R4=FAILED"
    echo [4/4] stopping server ... FAILED: process %SERVER_PID% is still running
    goto cleanup
)
rem Windows frees the port when the process is gone; allow it a few seconds.
set /a TRIES=0
:check_port
"%PYTHON%" -c "import socket, sys; s = socket.socket(); s.bind(('127.0.0.1', int(sys.argv[1]))); s.listen(); s.close()" %PORT% >nul 2>&1
if not errorlevel 1 goto port_released
set /a TRIES+=1
if %TRIES% geq 5 goto port_busy
ping -n 2 127.0.0.1 >nul
goto check_port

:port_released
set "R4=ok"
echo [4/4] stopping server ... ok: port %PORT% released
goto cleanup

:port_busy
set "R4=FAILED"
echo [4/4] stopping server ... FAILED: port %PORT% is still in use
goto cleanup

:server_gone
set "SERVER_PID="
set "R4=FAILED"
echo       the server stopped on its own; its log:
type "%LOG%"
goto cleanup

:start_exited
set "SERVER_PID="
set "R1=FAILED"
echo [1/4] starting server ... FAILED: the server exited; its log:
type "%LOG%"
goto cleanup

:start_timeout
set "R1=FAILED"
echo [1/4] starting server ... FAILED: no "Listening on" line within about 20 s; its log:
type "%LOG%"
goto cleanup

:start_failed
set "R1=FAILED"
echo [1/4] starting server ... FAILED: could not start %PYTHON% -m collab_trio serve
goto cleanup

rem ---- cleanup and summary: every path after the work directory ends here ----
:cleanup
if defined SERVER_PID (
    echo cleanup: stopping the server, pid %SERVER_PID%
    call :stop_server
)
if defined WORK rmdir /s /q "%WORK%" >nul 2>&1
echo.
echo summary:
echo   [1/4] start server       %R1%
echo   [2/4] Qt smoke client    %R2%
echo   [3/4] integration        %R3%
echo   [4/4] stop server        %R4%
set "RC=1"
if "%R1%%R2%%R3%%R4%"=="okokokok" set "RC=0"
if "%RC%"=="0" (
    echo ALL 4 CHECKS PASSED
) else (
    echo FAILED: not every check passed
)
endlocal & exit /b %RC%

rem ---- subroutines ------------------------------------------------------------

:server_running
rem errorlevel 0 while process SERVER_PID exists, 1 otherwise.
if not defined SERVER_PID exit /b 1
tasklist /fi "PID eq %SERVER_PID%" /nh 2>nul | find "%SERVER_PID%" >nul
exit /b %errorlevel%

:stop_server
rem taskkill /F: a console process ignores the polite request. Wait at most about 10 s.
taskkill /pid %SERVER_PID% /t /f >nul 2>&1
set /a STOP_TRIES=0
:stop_wait
call :server_running
if errorlevel 1 (
    set "SERVER_PID="
    exit /b 0
)
set /a STOP_TRIES+=1
if %STOP_TRIES% geq 10 exit /b 1
ping -n 2 127.0.0.1 >nul
goto stop_wait

rem ---- argument and setup errors (nothing started yet) --------------------------

:usage
echo Quick checks after "pip install .[qt]":
echo   [1/4] start collab-trio serve on 127.0.0.1:PORT
echo   [2/4] the PyQt6 smoke client against it
echo   [3/4] the multi-client integration run against it
echo   [4/4] stop the server and check that the port can be bound again
echo.
echo Usage: tools\run_tests.bat [PORT]   or   tools\run_tests.bat --port PORT
echo   PORT defaults to 8765; "set PYTHON=C:\path\to\python.exe" selects the interpreter.
echo Exits 0 only when every check passes.
endlocal & exit /b 0

:bad_args
echo error: too many arguments; usage: tools\run_tests.bat [PORT] 1>&2
endlocal & exit /b 2

:bad_port
echo error: the port must be a number from 1 to 65535, not "%PORT%" 1>&2
endlocal & exit /b 2

:not_installed
echo error: %PYTHON% cannot import collab_trio and PyQt6.QtWebSockets; 1>&2
echo        install them with: pip install .[qt] 1>&2
endlocal & exit /b 1

:no_workdir
echo error: cannot create the directory %WORK% 1>&2
endlocal & exit /b 1
